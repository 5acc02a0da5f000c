"""Run inside an environment with a transformers release: the single-release crashes of Gemma-4 and Gemma-3n that
release has, each reproduced on a tiny model, then measured again after ``rewriter.compile``. Prints one JSON
object.

    python tests/release_check_crashes.py CACHE_DIR

The crashes, by rule (and the oracle the patched model is compared with, on the same weights):

- ``per-layer-inputs-none`` (5.23.0-5.24.0): a Gemma-4 text model without per-layer inputs but with KV-shared layers
  crashes slicing its inputs before the KV-shared layers. Oracle: the same model asked for its hidden states, which
  upstream never slices (``output_hidden_states=True``), in the same release.
- ``video-features-tuple`` (5.15.0): any Gemma-4 video input. Oracle: the same frames passed as images, whose path
  upstream concatenates, in the same release.
- ``placeholder-mask-defaults`` (4.55.0) and ``audio-outputs-collision`` (5.0.0-5.2.0): any Gemma-3n audio input.
  Oracle: the release that fixed each (4.55.1, 5.3.0) on the same weights, ``fixtures/gemma3n_audio_reference.pt``
  (``fixtures/make_gemma3n_audio_reference.py`` makes it).

Used by tests/test_crashes.py; kept a plain script so that it runs under whatever transformers that environment
has (4.x included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The test environment's datasets needs huggingface_hub 1.x, which a 4.x release replaces with 0.x in its virtual
# environment: hide it, or importing parts of transformers fails.
sys.modules["datasets"] = None

import torch

import rewriter
from rewriter import testing

REFERENCE = Path(__file__).with_name("fixtures") / "gemma3n_audio_reference.pt"
# Each crash: its family and the releases that have it (first, last).
CRASHES = {
    "per-layer-inputs-none": ("gemma4", "5.23.0", "5.24.0"),
    "video-features-tuple": ("gemma4", "5.15.0", "5.15.0"),
    "placeholder-mask-defaults": ("gemma3n", "4.55.0", "4.55.0"),
    "audio-outputs-collision": ("gemma3n", "5.0.0", "5.2.0"),
}
# The release that fixed each crash: the oracle of the Gemma-3n ones.
FIXED_IN = {"placeholder-mask-defaults": "4.55.1", "audio-outputs-collision": "5.3.0"}


def release(version: str) -> tuple[int, ...]:
    return tuple(map(int, version.split(".")))


def crashes_of(version: str) -> list[str]:
    return [rule for rule, (_, first, last) in CRASHES.items() if release(first) <= release(version) <= release(last)]


def error_of(call) -> str | None:
    """``"Type: message"`` of what ``call()`` raises, ``None`` if it runs."""
    try:
        with torch.no_grad():
            call()
    except Exception as error:  # noqa: BLE001 - the crash is what is measured
        return f"{type(error).__name__}: {error}"
    return None


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- per-layer-inputs-none ----------------------------------------------------------------------------------------


def no_per_layer_inputs_model():
    """A tiny Gemma-4 text model with two KV-shared layers and no per-layer inputs, as the assistant drafter is."""
    return testing.causal_lm(2, config=testing.text_config(2, hidden_size_per_layer_input=0))


def per_layer_inputs_none(model, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        sliced = model(ids).logits
        unsliced = model(ids, output_hidden_states=True).logits
        last = model(ids, logits_to_keep=1).logits
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        oracle = model.generate(
            ids, max_new_tokens=4, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
        ).sequences
    return {
        "logits_equal_unsliced": torch.equal(sliced, unsliced),
        "last_position_gap": gap(last, unsliced[:, -1:]),
        "generate_equals_unsliced": torch.equal(tokens, oracle),
    }


# -- video-features-tuple -----------------------------------------------------------------------------------------


def video_model():
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(testing.vision_config()).eval()


def video_inputs(frames: int = 2, seed: int = 2) -> dict:
    """One video of ``frames`` frames (each ``testing.image_patches()``, 4 soft tokens) and its video tokens."""
    pixels, positions = testing.image_patches(seed=seed)
    video = testing.SPECIAL_TOKENS["video_token_id"]
    return {
        "input_ids": torch.tensor([[2, 17, *[video] * (4 * frames), 99, 7]]),
        "pixel_values_videos": pixels.unsqueeze(1).repeat(1, frames, 1, 1),
        "video_position_ids": positions.unsqueeze(1).repeat(1, frames, 1, 1),
    }


def as_images(inputs: dict) -> dict:
    """The same frames as images, with image tokens where the video tokens were."""
    video, image = testing.SPECIAL_TOKENS["video_token_id"], testing.SPECIAL_TOKENS["image_token_id"]
    ids = inputs["input_ids"]
    return {
        "input_ids": torch.where(ids == video, image, ids),
        "pixel_values": inputs["pixel_values_videos"][0],
        "image_position_ids": inputs["video_position_ids"][0],
    }


def video_features_tuple(model, inputs: dict) -> dict:
    with torch.no_grad():
        video = model(**inputs).logits
        images = model(**as_images(inputs)).logits
        another = model(**video_inputs(seed=5)).logits
    return {
        "logits_shape": list(video.shape),
        "logits_equal_as_images": torch.equal(video, images),
        "another_video_gap": gap(video, another),  # the frames reach the logits
    }


# -- placeholder-mask-defaults, audio-outputs-collision -----------------------------------------------------------


def gemma3n_audio_model():
    """A tiny Gemma-3n multimodal model with a real one-layer audio conformer (four soft tokens a clip): the text
    model of ``testing.gemma3n_text_config`` without KV sharing (so that kv-sharing-without-cache does not change the
    logits), every parameter drawn from one seeded generator in name order so that every release builds the same
    weights (``weights`` names them). In eval mode."""
    import transformers

    config = transformers.Gemma3nConfig(
        text_config=testing.gemma3n_text_config(num_kv_shared_layers=0, vocab_size=272).to_dict(),
        vision_config={"hidden_size": 64, "vocab_offset": 256, "vocab_size": 8},  # ids 256-263
        audio_config={
            "hidden_size": 64,
            "vocab_offset": 264,  # ids 264-271
            "vocab_size": 8,
            "input_feat_size": 16,
            "conf_num_hidden_layers": 1,
            "conf_num_attention_heads": 4,
            "sscp_conv_channel_size": [8, 8],
        },
        audio_soft_tokens_per_image=4,
        image_token_id=257,
        boi_token_id=256,
        eoi_token_id=258,
        audio_token_id=265,
        boa_token_id=264,
        eoa_token_id=266,
    )
    # the vision tower gets no input here: an empty module; the audio tower is the real one
    return testing.seeded_in_name_order(testing.gemma3n_multimodal(config, "gemma3n_vision")).eval()


def audio_inputs(seed: int = 3) -> dict:
    """One clip of 64 mel frames (16 after the subsampler, 4 soft tokens) between ``boa`` and ``eoa``."""
    return {
        "input_ids": torch.tensor([[2, 17, 264, 265, 265, 265, 265, 266, 99, 7]]),
        "input_features": torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(seed)),
        "input_features_mask": torch.ones(1, 64, dtype=torch.bool),  # the processor's: True where a frame is
    }


def audio_logits(model, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(**audio_inputs(seed)).logits


def gemma3n_audio(model, rule: str) -> dict:
    reference = torch.load(REFERENCE, weights_only=True)[FIXED_IN[rule]]
    logits = audio_logits(model)
    return {
        "oracle": FIXED_IN[rule],
        "same_weights_as_oracle": testing.weights_digest(model) == reference["weights"],
        "logits_equal_oracle": torch.equal(logits, reference["logits"]),
        "oracle_gap": gap(logits, reference["logits"]),
        "another_clip_gap": gap(logits, audio_logits(model, seed=4)),  # the audio reaches the logits
    }


# -----------------------------------------------------------------------------------------------------------------


def setups(rule: str):
    """``(model, run)``: the tiny model of ``rule``'s crash, and a call of it that returns the measurements."""
    if rule == "per-layer-inputs-none":
        model, ids = no_per_layer_inputs_model(), testing.input_ids(length=12)
        return model, lambda: model(ids), lambda: per_layer_inputs_none(model, ids)
    if rule == "video-features-tuple":
        model, inputs = video_model(), video_inputs()
        return model, lambda: model(**inputs), lambda: video_features_tuple(model, inputs)
    model = gemma3n_audio_model()
    return model, lambda: audio_logits(model), lambda: gemma3n_audio(model, rule)


def main(cache: str) -> None:
    import transformers

    version = transformers.__version__
    rules = crashes_of(version)
    result = {"transformers": version, "crashes": rules, "unpatched": {}, "patched": {}, "outcomes": {}}
    built = {rule: setups(rule) for rule in rules}
    for rule, (_, crash, _) in built.items():
        result["unpatched"][rule] = error_of(crash)
    for family in dict.fromkeys(CRASHES[rule][0] for rule in rules):
        report = rewriter.compile(family, cache_dir=cache, strict=True)
        for rule in rules:
            if CRASHES[rule][0] == family:
                outcome = report.outcome(rule)
                result["outcomes"][rule] = [outcome.status, outcome.sites]
    for rule, (_, crash, measure) in built.items():
        error = error_of(crash)
        result["patched"][rule] = measure() if error is None else error
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
