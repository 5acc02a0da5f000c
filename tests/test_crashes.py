"""Four crashes that a few releases shipped, each on every input of one kind, and rewriter's replay of upstream's fix:

- per-layer-inputs-none (Gemma-4, 5.23.0-5.24.0): a text model without per-layer inputs but with KV-shared layers
  (the assistant drafter's configuration) raises ``TypeError`` on any forward of more than one position;
- video-features-tuple (Gemma-4, 5.15.0): every video input raises ``AttributeError: 'tuple' object has no
  attribute 'to'``;
- placeholder-mask-defaults (Gemma-3n, 4.55.0): every image or audio input raises ``TypeError`` (a missing
  argument of ``get_placeholder_mask``);
- audio-outputs-collision (Gemma-3n, 5.0.0-5.2.0): every audio input raises ``AttributeError: 'Tensor' object has
  no attribute 'audio_mel_mask'``.

Each test installs one buggy release into its own virtual environment and runs ``tests/release_check_crashes.py``
there: the crash unpatched, then, patched, the oracle's output exactly on the same weights. The oracles are paths
upstream gets right in the same release for the Gemma-4 crashes (the unsliced forward; the same frames as images),
and the release that fixed each Gemma-3n crash (4.55.1, 5.3.0: ``fixtures/gemma3n_audio_reference.pt``). The test
environment (5.5.0) has none of these bugs, and the suite's time goes elsewhere: each test runs only when
REWRITER_E2E_RELEASES names its release (or is "all").
"""

from __future__ import annotations

import pytest

from tests.conftest import release_check
from tests.test_releases import e2e_releases

# rule: (family, the release the test installs, what it raises there unpatched)
CRASHES = {
    "per-layer-inputs-none": ("gemma4", "5.23.0", "TypeError: 'NoneType' object is not subscriptable"),
    "video-features-tuple": ("gemma4", "5.15.0", "AttributeError: 'tuple' object has no attribute 'to'"),
    "placeholder-mask-defaults": (
        "gemma3n",
        "4.55.0",
        "TypeError: Gemma3nModel.get_placeholder_mask() missing 1 required positional argument: 'image_features'",
    ),
    "audio-outputs-collision": (
        "gemma3n",
        "5.2.0",
        "AttributeError: 'Tensor' object has no attribute 'audio_mel_mask'",
    ),
}


def chosen(rule: str):
    family, version, _ = CRASHES[rule]
    skip = version not in e2e_releases(family, default="")
    reason = f"transformers {version}: set REWRITER_E2E_RELEASES={version} (or all) to install it"
    return pytest.param(rule, version, id=f"{rule}-{version}", marks=pytest.mark.skipif(skip, reason=reason))


@pytest.mark.parametrize("rule, version", [chosen(rule) for rule in CRASHES])
def test_crash_unpatched_and_oracle_output_patched(rule, version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check_crashes.py", tmp_path / "cache", cwd=tmp_path)
    assert result["transformers"] == version and result["crashes"] == [rule]
    assert result["unpatched"][rule] == CRASHES[rule][2]
    assert result["outcomes"][rule] == ["applied", 1]
    patched = result["patched"][rule]
    assert isinstance(patched, dict), patched  # else what the patched model raised
    if rule == "per-layer-inputs-none":
        assert patched["logits_equal_unsliced"] and patched["generate_equals_unsliced"]
        assert patched["last_position_gap"] < 1e-5  # the KV-shared layers on one query: the last float bits
    elif rule == "video-features-tuple":
        assert patched["logits_equal_as_images"]
        assert patched["another_video_gap"] > 1e-3  # the frames reach the logits
    else:
        assert patched["same_weights_as_oracle"] and patched["logits_equal_oracle"]
        assert patched["another_clip_gap"] > 1e-3  # the audio reaches the logits
