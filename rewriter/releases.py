"""transformers releases as wheels: fetched once with pip, read without installing or importing them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import platformdirs

from rewriter.report import RewriterError


class FetchError(RewriterError):
    """A release wheel could not be downloaded."""


def wheel_dir() -> Path:
    return Path(os.environ.get("REWRITER_WHEEL_DIR") or platformdirs.user_cache_dir("rewriter-wheels"))


def fetch_wheel(version: str, folder: Path | None = None) -> Path:
    """The transformers wheel of ``version``, downloaded with ``pip download --no-deps`` unless already there."""
    folder = folder or wheel_dir()
    wheel = folder / f"transformers-{version}-py3-none-any.whl"
    if not wheel.exists():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
        pip = subprocess.run([*command, "-d", str(folder), f"transformers=={version}"], capture_output=True, text=True)
        if pip.returncode != 0 or not wheel.exists():
            why = pip.stderr.strip().splitlines()[-1:] or [f"pip exited with {pip.returncode} and no wheel"]
            raise FetchError(f"cannot download the transformers {version} wheel: {why[0]}")
    return wheel


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def wheel_sources(wheel: Path, targets: tuple[str, ...]) -> dict[str, str]:
    """The text of each target file (relative to the transformers package) inside ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        return {target: archive.read(f"transformers/{target}").decode("utf-8") for target in targets}
