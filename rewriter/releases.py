"""transformers releases as wheels: fetched once with pip, read without installing or importing them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs
from packaging.version import Version

from rewriter.report import RewriterError

RELEASES_FILE = Path(__file__).with_name("releases.txt")
# Every transformers release from Gemma-3n's first (4.53.0) to the latest the rules were checked on, oldest first.
RELEASES = tuple(line for line in RELEASES_FILE.read_text().splitlines() if line and not line.startswith("#"))


class FetchError(RewriterError):
    """A release wheel could not be downloaded."""


def wheel_dir() -> Path:
    return Path(os.environ.get("REWRITER_WHEEL_DIR") or platformdirs.user_cache_dir("rewriter-wheels"))


def fetch_wheel(version: str, folder: Path | None = None) -> Path:
    """The transformers wheel of ``version``, downloaded with ``pip download --no-deps`` unless already there. The
    download lands in a folder of its own and is renamed into place: a process that finds the wheel finds it whole,
    whatever others download at the same time."""
    folder = folder or wheel_dir()
    wheel = folder / f"transformers-{version}-py3-none-any.whl"
    if not wheel.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as download:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
            pip = subprocess.run([*command, "-d", download, f"transformers=={version}"], capture_output=True, text=True)
            downloaded = Path(download) / wheel.name
            if pip.returncode != 0 or not downloaded.exists():
                why = pip.stderr.strip().splitlines()[-1:] or [f"pip exited with {pip.returncode} and no wheel"]
                raise FetchError(f"cannot download the transformers {version} wheel: {why[0]}")
            os.replace(downloaded, wheel)
    return wheel


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def wheel_sources(wheel: Path, targets: tuple[str, ...]) -> dict[str, str]:
    """The text of each target file (relative to the transformers package) inside ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        return {target: archive.read(f"transformers/{target}").decode("utf-8") for target in targets}


def pypi_releases() -> list[str]:
    """Every transformers release PyPI lists (pre-releases and yanked ones left out), oldest first, as
    ``pip index versions`` reports them."""
    command = [sys.executable, "-m", "pip", "index", "versions", "--disable-pip-version-check", "transformers"]
    pip = subprocess.run(command, capture_output=True, text=True)
    listed = next((line for line in pip.stdout.splitlines() if line.startswith("Available versions:")), None)
    if pip.returncode != 0 or listed is None:
        why = pip.stderr.strip().splitlines()[-1:] or [f"pip exited with {pip.returncode}"]
        raise FetchError(f"cannot list transformers releases on PyPI: {why[0]}")
    return sorted(listed.removeprefix("Available versions:").replace(",", " ").split(), key=Version)


def add_releases(versions: list[str]) -> None:
    """Append ``versions`` (newer than every known release) to ``RELEASES_FILE``."""
    with RELEASES_FILE.open("a", encoding="utf-8") as file:
        file.writelines(f"{version}\n" for version in versions)
