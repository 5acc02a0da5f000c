"""Run inside an environment with a transformers release whose Gemma-4 audio tower refuses SDPA (5.20.0 on): an
explicit ``attn_implementation`` on a model with an audio tower, unpatched then patched. Prints one JSON object.

    python tests/release_check_audio_sdpa.py CACHE_DIR

- unpatched: ``"sdpa"`` and ``"flex_attention"`` raise ``ValueError`` at construction. The oracle is the default
  build, whose audio tower falls back to eager: its audio features on a padded batch of two clips of different
  lengths, and the logits of an all-eager forward with audio tokens, on the same weights.
- patched (``rewriter.compile("gemma4")``): every implementation builds, directly and through ``from_pretrained``;
  the implementation each tower ends up with; the gap of the audio features and of the logits to the oracle;
  and ``set_attn_implementation("sdpa")`` after loading, which the rewrite does not reach.

Used by tests/test_audio_sdpa_fallback.py; kept a plain script so that it runs under whatever transformers that
environment has.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

import rewriter
from rewriter import testing

IMPLEMENTATIONS = ("sdpa", "flex_attention")
FEATURES = 16  # the input width the tiny tower takes: 4 * hidden_size / subsampling_conv_channels[-1]
FRAMES = 40


def config():
    """``testing.vision_config()`` with a two-layer audio tower (chunks of 4 frames, 5 frames of left context):
    a fresh config each time, since building a model with an ``attn_implementation`` writes it into the config."""
    from transformers import Gemma4Config

    vision = testing.vision_config()
    audio = testing.audio_config(attention_chunk_size=4, attention_context_left=5, attention_context_right=0)
    return Gemma4Config(
        **testing.SPECIAL_TOKENS, text_config=vision.text_config, vision_config=vision.vision_config, audio_config=audio
    )


def clips(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input features and mask of ``batch`` clips; the second one is shorter (its last 15 frames are padding)."""
    features = torch.randn(batch, FRAMES, FEATURES, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, FRAMES, dtype=torch.bool)
    mask[1:, FRAMES - 15 :] = False
    return features, mask


def build(attn_implementation=None, state_dict=None):
    from transformers import Gemma4ForConditionalGeneration

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = Gemma4ForConditionalGeneration._from_config(config(), **kwargs).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def refusal(attn_implementation) -> str | None:
    """The error building with ``attn_implementation`` raises, as ``Type: first words``; ``None`` if it builds."""
    try:
        build(attn_implementation)
    except ValueError as error:
        return f"{type(error).__name__}: {str(error)[:60]}"
    return None


def towers(model) -> dict:
    """The implementation the model and each of its towers ended up with."""
    inner = model.model
    return {
        "model": model.config._attn_implementation,
        "text": inner.language_model.config._attn_implementation,
        "vision": inner.vision_tower.config._attn_implementation,
        "audio": inner.audio_tower.config._attn_implementation,
    }


def audio_features(model) -> torch.Tensor:
    with torch.no_grad():
        return model.model.get_audio_features(*clips(2)).last_hidden_state


def audio_prompt(model) -> dict:
    """A forward's inputs: text, then one clip's audio tokens between ``boa`` and more text."""
    features, mask = clips(1)
    with torch.no_grad():
        tokens = int(model.model.audio_tower(features, mask).attention_mask.sum())
    audio = [testing.SPECIAL_TOKENS["audio_token_id"]] * tokens
    ids = torch.tensor([[2, 17, testing.SPECIAL_TOKENS["boa_token_id"], *audio, 99, 7]])
    return {"input_ids": ids, "input_features": features, "input_features_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def unpatched() -> tuple[dict, dict]:
    """What an explicit implementation does unpatched, and the oracle: weights, audio features, all-eager logits."""
    torch.manual_seed(0)
    default = build()
    state_dict = default.state_dict()
    inputs = audio_prompt(default)
    oracle = {
        "state_dict": state_dict,
        "features": audio_features(default),
        "logits": logits(build("eager", state_dict), inputs),
        "inputs": inputs,
    }
    found = {"refusals": {name: refusal(name) for name in IMPLEMENTATIONS}, "towers": {"default": towers(default)}}
    return found, oracle


def patched(oracle: dict) -> dict:
    from transformers import Gemma4ForConditionalGeneration

    found = {"towers": {}, "features_equal": {}, "features_gap": {}}
    for name in (None, *IMPLEMENTATIONS):
        model = build(name, oracle["state_dict"])
        found["towers"][str(name)] = towers(model)
        features = audio_features(model)
        found["features_equal"][str(name)] = torch.equal(features, oracle["features"])
        found["features_gap"][str(name)] = gap(features, oracle["features"])
    found["logits_gap"] = gap(logits(build("sdpa", oracle["state_dict"]), oracle["inputs"]), oracle["logits"])

    with tempfile.TemporaryDirectory() as folder:
        build(None, oracle["state_dict"]).save_pretrained(folder)
        loaded = Gemma4ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
        found["from_pretrained"] = {
            "towers": towers(loaded),
            "features_equal": torch.equal(audio_features(loaded), oracle["features"]),
        }
    default = build(None, oracle["state_dict"])
    try:
        default.set_attn_implementation("sdpa")
        found["set_attn_implementation"] = None
    except ValueError as error:
        found["set_attn_implementation"] = f"ValueError: {str(error)[:60]}"
    return found


def main(cache_dir: str) -> dict:
    import transformers

    result = {"transformers": transformers.__version__}
    result["unpatched"], oracle = unpatched()
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    result["outcomes"] = {outcome.rule: [outcome.status, outcome.sites] for outcome in report.outcomes}
    result["patched"] = patched(oracle)
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
