"""Shared fixtures: every test starts and ends with the original transformers code installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from filelock import FileLock

import rewriter
from rewriter.families import FAMILIES, installed_transformers
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


def torchrun_train(
    tmp_path: Path, family: str, mode: str, how: str, ranks: int = 2, python=sys.executable, env: dict | None = None
) -> list[dict]:
    """Every rank's result of ``tests/distributed_train.py`` run by ``ranks`` processes under ``torchrun``, with
    ``tmp_path / "cache"`` as the cache folder."""
    out = tmp_path / f"{family}-{mode}-{how}-{ranks}"
    out.mkdir()
    script = [ROOT / "tests" / "distributed_train.py", family, mode, how, tmp_path / "cache", out]
    command = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *map(str, script)]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, **(env or {})}
    )
    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank-*.json"))]
    assert run.returncode == 0 and len(results) == ranks, run.stdout[-2000:] + run.stderr[-3000:]
    return results


def hash_seeds_by_order(count: int) -> dict[tuple[str, ...], list[int]]:
    """Seeds grouped by the order a set of the tiny models' layer types iterates in under them (no torch needed)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    code = 'print(" ".join(set(["sliding_attention", "full_attention"] * 3)))'
    for seed in range(count):
        order = run_python(code, env={"PYTHONHASHSEED": str(seed)}).stdout.split()
        groups.setdefault(tuple(order), []).append(seed)
    return groups


def session_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this test session that every pytest-xdist worker sees: the parent of the workers' base folders."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def build_wheel(folder: Path) -> tuple[Path, str]:
    """rewriter's wheel, built into ``folder``, and what the build printed. ``build/`` goes first: setuptools reuses
    it, and it keeps files since removed from the tree (cache entries of an older prebuild). One build at a time."""
    with FileLock(ROOT / "build.lock"):
        shutil.rmtree(ROOT / "build", ignore_errors=True)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", folder, ROOT]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return next(Path(folder).glob("rewriter-*.whl")), result.stdout + result.stderr


@pytest.fixture(scope="session")
def rewriter_wheel(tmp_path_factory) -> Path:
    """rewriter's wheel, built once a session."""
    folder = session_folder(tmp_path_factory, "wheel")
    with FileLock(folder.with_name("wheel.lock")):
        return next(folder.glob("rewriter-*.whl"), None) or build_wheel(folder)[0]


@pytest.fixture(scope="session")
def release_env(tmp_path_factory, rewriter_wheel):
    """``release_env(version)``: the Python of a virtual environment with transformers ``version``, made once a
    session (``release_python``)."""

    def python(version: str) -> Path:
        folder = session_folder(tmp_path_factory, f"venv-{version}")
        with FileLock(folder.with_name(f"venv-{version}.lock")):
            if not (folder / "made").exists():
                release_python(version, folder, rewriter_wheel)
                (folder / "made").touch()
        return folder / "bin" / "python"

    return python


def release_check(python: Path, script: str, *args, cwd: Path, timeout: float | None = None) -> dict:
    """The JSON object that ``tests/<script>`` prints last, run with ``args`` by ``python`` (a release's environment)
    in ``cwd``; the test fails on a non-zero exit."""
    command = [python, ROOT / "tests" / script, *map(str, args)]
    check = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert check.returncode == 0, check.stderr[-3000:]
    return json.loads(check.stdout.strip().splitlines()[-1])


def release_python(version: str, folder: Path, rewriter_wheel: Path) -> Path:
    """A virtual environment with transformers ``version`` and rewriter, reusing this environment's packages
    (torch above all) for everything else."""
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    python = folder / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    (site / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", rewriter_wheel], check=True)
    subprocess.run([*pip, fetch_wheel(version)], check=True)  # the wheel the release checks read, downloaded once
    return python


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

    version, package = installed_transformers(FAMILIES["gemma4"])
    for name in {target for family in FAMILIES.values() for target in family.targets}:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / name, folder / name)
    text = (folder / target).read_text()
    assert text.count(old) >= 1, f"{old!r} is not in {target}"
    (folder / target).write_text(text.replace(old, new))
    monkeypatch.setattr(api, "installed_transformers", lambda family: (version, folder))


def shared_layers_weights_are_gone(family: str, reference: dict, folder: Path, cache_dir: Path) -> None:
    """Patched ``family`` builds its KV-shared layers without K/V weights, exactly as the ``reference`` release that
    fixed the bug natively: the same state dict, loaded strictly; a checkpoint the unpatched release saved, which holds
    those weights, loads with nothing unexpected and gives the reference's logits; every parameter gets a gradient
    from a gradient-checkpointed step without a cache (what DDP with ``find_unused_parameters=False`` needs)."""
    import torch

    from rewriter import testing

    rewriter.restore(family)
    unpatched = testing.text_model(family)
    unpatched.load_state_dict(reference["state_dict"], strict=False)
    unpatched.save_pretrained(folder)
    stock_names = set(unpatched.state_dict())
    assert stock_names > set(reference["state_dict"])  # the unpatched release keeps the shared layers' K/V weights

    rewriter.compile(family, cache_dir=cache_dir, strict=True)
    model = testing.text_model(family)
    assert model.state_dict().keys() == reference["state_dict"].keys()
    model.load_state_dict(reference["state_dict"])
    loaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    ignored = stock_names - set(reference["state_dict"])  # by the patterns the patched models list
    assert all(any(re.search(pattern, name) for pattern in loaded._keys_to_ignore_on_load_unexpected) for name in ignored)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(reference["input_ids"]).logits, reference["logits"])

    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = reference["input_ids"]
    model(ids, labels=ids, use_cache=False).loss.backward()
    assert [name for name, parameter in model.named_parameters() if parameter.grad is None] == []
