"""Three bugs of the Gemma-4 audio tower, on a tiny tower with the real checkpoints' chunking (chunks of 12 frames,
13 of left context; 5.5.0 and 5.6.x assume it in the relative positions):

- audio-eager-mask (5.5.0 to 5.19.x): with ``attn_implementation="eager"`` the tower reads eager's additive float
  mask as a boolean one and attends exactly where it should not. The oracle is 5.20.0, which fixed it: its eager
  features on the same weights, in ``fixtures/audio_eager_mask_reference.pt``; sdpa, which upstream gets right in
  every release, gives them too.
- audio-features-dtype (5.5.0 to 5.14.x): under autocast, or with the audio tower in another dtype than the text
  model, scattering the audio features raises. The oracle is 5.15.0, which fixed it: its logits on the same
  weights, in ``fixtures/audio_features_dtype_reference.pt``.
- audio-quantized-weights (5.5.0 to 5.10.x): with bitsandbytes (4-bit or 8-bit, real on this CPU) the tower calls
  ``torch.finfo`` on packed integer weights. The oracle is 5.11.0, which fixed it: its features of the same
  quantized tower, in ``fixtures/audio_quantized_weights_reference.pt``.

Every parameter is drawn from a generator seeded by its name (``testing.seeded``), so that any release builds the same
weights; ``fixtures/make_audio_*_reference.py`` run these builders under the fixed releases. The references were
computed on one CPU: another instruction set's kernels may round otherwise, but on this one patched 5.5.0 gives the
fixed releases' numbers to the last bit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import rewriter
from rewriter import testing

FIXTURES = Path(__file__).with_name("fixtures")
SAME_DTYPES = "expected self and source to have same dtypes"
FINFO_OF_INTEGERS = r"torch.finfo\(\) requires a floating point input type"


def config():
    """A two-layer text model (no per-layer inputs) with the tiny audio tower and no vision tower."""
    from transformers import Gemma4Config

    text = testing.text_config(
        0, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0
    )
    audio = testing.audio_config()
    return Gemma4Config(**testing.SPECIAL_TOKENS, text_config=text, vision_config=None, audio_config=audio)


# audio-features-dtype: a full model and an audio prompt, in three dtype set-ups


def audio_model(mode: str):
    """The tiny model in float32 (``"float32"``, ``"autocast"``), or in bfloat16 with the audio tower and its
    embedder kept in float32 (``"mixed"``)."""
    from transformers import Gemma4ForConditionalGeneration

    model = testing.seeded(Gemma4ForConditionalGeneration(config()))
    if mode == "mixed":
        model.to(torch.bfloat16)
        model.model.audio_tower.float()
        model.model.embed_audio.float()
    return model


def audio_prompt() -> dict:
    """Text, then ``<boa>`` and one clip's 20 audio tokens, then text."""
    features, mask = testing.audio_clips(1)
    audio = [testing.SPECIAL_TOKENS["audio_token_id"]] * (testing.AUDIO_FRAMES // 4)
    ids = torch.tensor([[2, 10, 11, testing.SPECIAL_TOKENS["boa_token_id"], *audio, 12, 13, 14]])
    return {"input_ids": ids, "input_features": features, "input_features_mask": mask}


def prompt_logits(mode: str) -> torch.Tensor:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return audio_model(mode)(**audio_prompt()).logits


# audio-quantized-weights: the tower saved once, loaded quantized


def quantization(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantized_tower(folder: Path, bits: int):
    """The tower saved in ``folder``, loaded by ``from_pretrained`` with bitsandbytes ``bits``-bit linears."""
    from transformers import Gemma4AudioModel

    tower = Gemma4AudioModel.from_pretrained(folder, quantization_config=quantization(bits), device_map="cpu")
    return tower.eval()


def reference(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_reference.pt", weights_only=True)


# ---- audio-eager-mask -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unpatched_eager_attends_where_the_mask_says_not_to(dtype):
    eager, sdpa = (testing.audio_features(testing.audio_tower(kind, dtype), dtype) for kind in ("eager", "sdpa"))
    assert (eager.float() - sdpa.float()).abs().max() > 0.1  # measured 0.154 (float32), 0.153 (bfloat16)


def whole_model_features(attn_implementation: str) -> torch.Tensor:
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration._from_config(config(), attn_implementation=attn_implementation)
    model = testing.seeded(model)
    assert model.model.audio_tower.config._attn_implementation == attn_implementation
    with torch.no_grad():
        return model.model.get_audio_features(*testing.audio_clips(), return_dict=True).last_hidden_state


def test_patched_eager_is_the_fixed_release_s_and_sdpa_s_bit_for_bit(cache_dir):
    fixed = reference("audio_eager_mask")
    assert fixed["transformers"] == "5.20.0"
    dtypes = (torch.float32, torch.bfloat16)
    sdpa = {dtype: testing.audio_features(testing.audio_tower("sdpa", dtype), dtype) for dtype in dtypes}
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    assert report.outcome("audio-eager-mask").status == "applied"
    for dtype, expected in sdpa.items():
        eager = testing.audio_features(testing.audio_tower("eager", dtype), dtype)
        assert torch.equal(eager, fixed["features"][str(dtype)]) and torch.equal(eager, expected)
    sdpa_after = testing.audio_features(testing.audio_tower("sdpa"))
    assert torch.equal(sdpa_after, sdpa[torch.float32])  # the boolean path is untouched
    assert torch.equal(whole_model_features("eager"), fixed["whole_model"])  # a whole model asked for eager


# ---- audio-features-dtype ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["autocast", "mixed"])
def test_unpatched_audio_features_of_another_dtype_raise(mode):
    with pytest.raises(RuntimeError, match=SAME_DTYPES):
        prompt_logits(mode)


def test_patched_logits_are_the_fixed_release_ones_bit_for_bit(cache_dir):
    expected = reference("audio_features_dtype")
    assert expected["transformers"] == "5.15.0"
    float32 = prompt_logits("float32")
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    assert report.outcome("audio-features-dtype").status == "applied"
    for mode in ("autocast", "mixed"):
        logits = prompt_logits(mode)
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, expected["logits"][mode])
    assert torch.equal(prompt_logits("float32"), float32)  # with one dtype the cast changes nothing


# ---- audio-quantized-weights ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tower(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio-tower")
    testing.audio_tower("sdpa").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [4, 8])
def test_unpatched_quantized_tower_calls_finfo_on_packed_weights(saved_tower, bits):
    tower = quantized_tower(saved_tower, bits)
    weight = tower.layers[0].feed_forward1.ffw_layer_1.linear.weight
    assert weight.dtype == (torch.uint8 if bits == 4 else torch.int8)  # bitsandbytes packed it
    with pytest.raises(TypeError, match=FINFO_OF_INTEGERS):
        testing.audio_features(tower)


def test_patched_quantized_tower_gives_the_fixed_release_features_bit_for_bit(saved_tower, cache_dir):
    expected = reference("audio_quantized_weights")
    assert expected["transformers"] == "5.11.0"
    outcome = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True).outcome("audio-quantized-weights")
    assert (outcome.status, outcome.sites) == ("applied", 3)
    for bits in (4, 8):
        features = testing.audio_features(quantized_tower(saved_tower, bits))
        assert torch.equal(features, expected["features"][f"{bits}-bit"])
