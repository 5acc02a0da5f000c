"""audio-sdpa-fallback on transformers 5.25.0 (``tests/release_check_audio_sdpa.py``, run in a virtual environment
with that release; the test environment's 5.5.0 does not have the bug): an explicit ``attn_implementation="sdpa"``
(or ``"flex_attention"``) on a Gemma-4 model with an audio tower raises unpatched, and builds patched with the audio
tower eager and the other towers as asked. The oracle is the default build, whose audio tower falls back to eager
unpatched: the same weights give the same audio features, bit for bit, and the logits of an all-eager model.
"""

from __future__ import annotations

import pytest

from tests.conftest import release_check

# A release with the bug; while it is the latest of rewriter/releases.txt, test_latest_release's environment serves.
RELEASE = "5.25.0"
REFUSAL = "ValueError: Gemma4AudioModel does not support"
AS_ASKED = {"model": "sdpa", "text": "sdpa", "vision": "sdpa", "audio": "eager"}


@pytest.fixture(scope="module")
def result(release_env, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("audio-sdpa")
    return release_check(release_env(RELEASE), "release_check_audio_sdpa.py", folder / "cache", cwd=folder, timeout=600)


def test_the_rule_patched_the_release(result):
    assert result["transformers"] == RELEASE
    assert result["outcomes"]["audio-sdpa-fallback"] == ["applied", 1]


def test_explicit_implementations_raise_unpatched(result):
    assert all(error.startswith(REFUSAL) for error in result["unpatched"]["refusals"].values())
    assert set(result["unpatched"]["refusals"]) == {"sdpa", "flex_attention"}
    assert result["unpatched"]["towers"]["default"] == AS_ASKED  # the default falls back to eager for audio


def test_patched_every_implementation_builds_with_the_audio_tower_eager(result):
    towers = result["patched"]["towers"]
    assert towers["None"] == towers["sdpa"] == result["patched"]["from_pretrained"]["towers"] == AS_ASKED
    assert towers["flex_attention"] == {**dict.fromkeys(AS_ASKED, "flex_attention"), "audio": "eager"}


def test_patched_audio_features_are_the_eager_oracle_bit_for_bit(result):
    assert result["patched"]["features_equal"] == {"None": True, "sdpa": True, "flex_attention": True}
    assert result["patched"]["from_pretrained"]["features_equal"] is True


def test_patched_sdpa_logits_with_audio_tokens_are_all_eager_ones(result):
    assert result["patched"]["logits_gap"] < 1e-5


def test_set_attn_implementation_after_loading_still_raises(result):
    """The rewrite changes ``__init__`` only; a per-model ``_check_and_adjust_attn_implementation`` would be a new
    method, which the installer cannot add (docs/bugs/audio-sdpa-fallback.md gives the dict workaround)."""
    assert result["patched"]["set_attn_implementation"].startswith(REFUSAL)
