"""Shared fixtures: every test starts and ends with the original transformers code installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rewriter
from rewriter.families import FAMILIES
from rewriter.releases import fetch_wheel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def unpatched():
    """Tests run against the real installed transformers; whatever a test patches is restored after it."""
    for family in FAMILIES:
        rewriter.restore(family)
    yield
    for family in FAMILIES:
        rewriter.restore(family)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def patched(cache_dir) -> rewriter.CompileReport:
    return rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)


def run_python(code: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run Python in a fresh process (the real import order a user has), failing the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )
    return result


def hash_seeds_by_order(count: int) -> dict[tuple[str, ...], list[int]]:
    """Seeds grouped by the order a set of the tiny models' layer types iterates in under them (no torch needed)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    code = 'print(" ".join(set(["sliding_attention", "full_attention"] * 3)))'
    for seed in range(count):
        order = run_python(code, env={"PYTHONHASHSEED": str(seed)}).stdout.split()
        groups.setdefault(tuple(order), []).append(seed)
    return groups


def build_wheel(folder: Path) -> tuple[Path, str]:
    """rewriter's wheel, built into ``folder``, and what the build printed. ``build/`` goes first: setuptools reuses
    it, and it keeps files since removed from the tree (cache entries of an older prebuild)."""
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", folder, ROOT]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return next(Path(folder).glob("rewriter-*.whl")), result.stdout + result.stderr


def release_tree(version: str, family: str, folder: Path) -> Path:
    """A transformers package folder in ``folder`` holding ``family``'s files of release ``version``, from its wheel."""
    with zipfile.ZipFile(fetch_wheel(version)) as wheel:
        for target in FAMILIES[family].targets:
            wheel.extract(f"transformers/{target}", folder)
    return folder / "transformers"


def mutated_transformers(folder: Path, monkeypatch, target: str, old: str, new: str) -> None:
    """Make ``rewriter.compile`` read a copy of the installed sources (every family's files) in which ``old``
    became ``new`` in ``target``."""
    from rewriter import api

    version, package = api.installed_transformers(FAMILIES["gemma4"])
    for name in {target for family in FAMILIES.values() for target in family.targets}:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / name, folder / name)
    text = (folder / target).read_text()
    assert text.count(old) >= 1, f"{old!r} is not in {target}"
    (folder / target).write_text(text.replace(old, new))
    monkeypatch.setattr(api, "installed_transformers", lambda family: (version, folder))
