"""transformers releases as wheels: fetched once with pip, read without installing or importing them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import platformdirs

from rewriter.report import RewriterError


# Every transformers release from Gemma-3n's first (4.53.0) to the latest the rules know, oldest first, as PyPI lists
# them, the yanked 5.10.0 left out: what each family is checked against and ships an entry for (those it supports).
# A new release is added here, then `python -m rewriter prebuild` writes its entries.
RELEASES = (
    "4.53.0", "4.53.1", "4.53.2", "4.53.3", "4.54.0", "4.54.1", "4.55.0", "4.55.1", "4.55.2", "4.55.3", "4.55.4",
    "4.56.0", "4.56.1", "4.56.2", "4.57.0", "4.57.1", "4.57.2", "4.57.3", "4.57.4", "4.57.5", "4.57.6", "5.0.0",
    "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.0", "5.5.1", "5.5.2", "5.5.3", "5.5.4", "5.6.0", "5.6.1", "5.6.2",
    "5.7.0", "5.8.0", "5.8.1", "5.9.0", "5.10.1", "5.10.2", "5.10.4", "5.11.0", "5.12.0", "5.12.1", "5.13.0",
    "5.13.1", "5.14.0", "5.14.1", "5.15.0", "5.15.1", "5.16.0", "5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.0",
    "5.20.1", "5.20.2", "5.21.0", "5.21.1", "5.22.0", "5.22.1", "5.22.2", "5.23.0", "5.24.0",
)


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
