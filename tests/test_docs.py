"""The documentation: the site builds with no warning, and README.md stays a newcomer's page."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_site_builds_strict(tmp_path):
    """``--strict`` turns every warning into a failure: a broken link or anchor, a page missing from the nav."""
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_short_and_nothing_points_outside_the_repository():
    assert len((ROOT / "README.md").read_bytes()) <= 10_000
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert [page.name for page in pages if "../shared" in page.read_text(encoding="utf-8")] == []
