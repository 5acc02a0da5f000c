"""image-bidirectional-mask: Gemma-4's bidirectional image mask (``use_bidirectional_attention="vision"``) reaches
past the sliding window (5.5.0 to 5.12.1) and onto full-attention layers (5.9.0 to 5.12.1).

The oracle is transformers 5.13.0, which fixed both, on the same weights: ``tests/fixtures/image_mask_reference.pt``
holds its logits for an image inside the window and one longer than it, eager and sdpa
(``tests/release_check_image_mask.py`` computes them and the gaps). 5.5.0, the test environment, has the first half;
5.12.1, the second shape the rule rewrites, runs when REWRITER_E2E_RELEASES names it (or is "all").
"""

from __future__ import annotations

from pathlib import Path

import pytest

import rewriter
from tests.conftest import release_check
from tests.release_check_image_mask import gaps
from tests.test_releases import e2e_releases

REFERENCE = Path(__file__).with_name("fixtures") / "image_mask_reference.pt"
INSIDE, ACROSS = "image inside the window", "image longer than the window"


@pytest.fixture(scope="module")
def reference():
    import torch

    saved = torch.load(REFERENCE)
    assert saved["transformers"] == "5.13.0"
    return saved["logits"]


def test_unpatched_image_tokens_see_each_other_past_the_window(reference):
    unpatched = gaps(reference)
    assert all(unpatched[f"{implementation}: {INSIDE}"] == 0.0 for implementation in ("eager", "sdpa"))
    assert all(unpatched[f"{implementation}: {ACROSS}"] > 0.01 for implementation in ("eager", "sdpa"))  # 0.028


def test_patched_logits_are_the_fixed_release_s(reference, cache_dir):
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    outcome = report.outcome("image-bidirectional-mask")
    assert (outcome.status, outcome.sites) == ("applied", 1)
    assert set(gaps(reference).values()) == {0.0}


@pytest.mark.parametrize("version", [version for version in e2e_releases("gemma4", default="") if version == "5.12.1"])
def test_full_attention_layers_lose_the_image_overlay_on_5_12_1(version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check_image_mask.py", "check", tmp_path / "cache", REFERENCE, cwd=tmp_path)
    assert result["transformers"] == version and result["outcome"] == ["applied", 2]
    assert min(result["unpatched"].values()) > 0.01  # 0.034 inside the window (full layers), 0.069 across it
    assert set(result["patched"].values()) == {0.0}
