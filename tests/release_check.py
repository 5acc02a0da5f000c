"""Run inside an environment with some transformers release: compile, then check every behaviour on tiny models.

    python tests/release_check.py CACHE_DIR      # prints one JSON object

Used by tests/test_releases.py, one virtual environment per release; kept a plain script so that it runs under
whatever transformers that environment has.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accumulation import train_one_step  # tests/, this script's folder

import rewriter
from rewriter import testing

# The definitions in modeling_gemma4.py each fine-tuning rule rewrites where it is needed.
NOT_NEEDED_PARTS = {
    "text-only-training": ("create_causal_mask_mapping", "Gemma4Model"),  # the function is gone from 5.9.0
    "loss-accumulation": ("Gemma4ForConditionalGeneration",),
    "fp16-vision-pooler": ("Gemma4VisionPooler", "Gemma4VisionModel"),
}


def definition_text(source: str, name: str) -> str | None:
    """The text of the top-level definition ``name``, or of the method ``Class.method``."""
    node = ast.parse(source)
    for part in name.split("."):
        node = next((child for child in node.body if getattr(child, "name", None) == part), None)
        if node is None:
            return None
    return ast.get_source_segment(source, node, padded=True)


def main(cache_dir: str) -> dict:
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    import transformers
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from bitsandbytes.nn import Params4bit
    from transformers.models.gemma4 import modeling_gemma4

    result = {
        "transformers": transformers.__version__,
        "origin": report.origin,
        "outcomes": {outcome.rule: [outcome.status, outcome.sites] for outcome in report.outcomes},
    }

    model, ids = testing.causal_lm(0), testing.input_ids()
    static = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    result["static_generate_equals_dynamic"] = torch.equal(static, model.generate(ids, max_new_tokens=8, do_sample=False))

    model = testing.causal_lm(2)
    with torch.no_grad():
        cached, uncached = model(ids, use_cache=True).logits, model(ids, use_cache=False).logits
    result["use_cache_gap"] = (cached - uncached).abs().max().item()

    torch.manual_seed(0)
    vision = transformers.Gemma4ForConditionalGeneration(testing.vision_config()).eval()
    embedder = vision.model.vision_tower.patch_embedder
    packed, state = quantize_4bit(embedder.input_proj.weight.detach().to(torch.bfloat16))
    embedder.input_proj.weight = Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
    pixels, positions = testing.image_patches()
    with torch.no_grad():
        vision.model.get_image_features(pixels, positions)
        projected = embedder.input_proj(2 * (pixels - 0.5))
    reference = F.linear((2 * (pixels - 0.5)).to(torch.bfloat16), dequantize_4bit(packed, state))
    result["packed_input_proj_gap"] = (projected - reference).abs().max().item()

    torch.manual_seed(0)
    bidirectional_config = testing.vision_config(use_bidirectional_attention="vision")
    bidirectional = transformers.Gemma4ForConditionalGeneration(bidirectional_config)
    with torch.no_grad():
        text_only = bidirectional.train()(input_ids=ids).logits
        all_text = bidirectional(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits
    result["text_only_training_gap"] = (text_only - all_text).abs().max().item()

    (whole, after_whole), (accumulated, after_accumulated) = train_one_step(4, 1), train_one_step(1, 4)
    result["accumulation_loss_gap"] = abs(whole - accumulated)
    gaps = [(after_whole[name] - after_accumulated[name]).abs().max().item() for name in after_whole]
    result["accumulation_weight_gap"] = max(gaps)

    vision = testing.overflowing_vision_model().half()
    with torch.no_grad():
        features = vision.model.vision_tower(pixels.half(), positions).last_hidden_state  # inf where it overflows
    result["float16_vision_features_finite"] = bool(torch.isfinite(features).all())

    # Where a rule is not needed, what it would touch must be upstream's code, byte for byte.
    package = Path(transformers.__file__).parent
    unchanged = {}
    if report.outcome("kv-shared-slice").status == "not_needed":
        cache_utils = rewriter.patched_source("gemma4", "cache_utils.py")
        unchanged["cache_utils.py"] = cache_utils == (package / "cache_utils.py").read_text()
    # rotary-compute-order patches the text model's __init__; kv-sharing-fsdp2, until 5.8.1, its forward
    shared_kv_parts = {"kv-sharing-without-cache": "Gemma4TextAttention", "kv-sharing-fsdp2": "Gemma4TextModel.forward"}
    for rule, name in shared_kv_parts.items():
        if report.outcome(rule).status == "not_needed":
            target = "models/gemma4/modeling_gemma4.py"
            patched, upstream = rewriter.patched_source("gemma4", target), (package / target).read_text()
            same_text = definition_text(patched, name) == definition_text(upstream, name)
            forward = inspect.unwrap(getattr(modeling_gemma4, name.split(".")[0]).forward)
            unchanged[name] = same_text and forward.__code__.co_filename == str(package / target)
    target = "models/gemma4/modeling_gemma4.py"
    patched, upstream = rewriter.patched_source("gemma4", target), (package / target).read_text()
    for rule, names in NOT_NEEDED_PARTS.items():
        if report.outcome(rule).status == "not_needed":
            for name in names:
                unchanged[name] = definition_text(patched, name) == definition_text(upstream, name)
    trainer = rewriter.compiled("trainer")  # gemma4 requires it: compiled when the accumulation check imported Trainer
    result["outcomes"].update({outcome.rule: [outcome.status, outcome.sites] for outcome in trainer.outcomes})
    if trainer.outcome("accumulation-double-division").status == "not_needed":
        patched_trainer = rewriter.patched_source("trainer", "trainer.py")
        unchanged["trainer.py"] = patched_trainer == (package / "trainer.py").read_text()
    result["unchanged_where_not_needed"] = unchanged

    for family in ("gemma3", "gemma3n"):
        rewriter.compile(family, cache_dir=cache_dir, strict=True)
    result["rotary_buffer_orders"] = {
        family: [name for name, _ in testing.text_model(family).named_buffers() if "inv_freq" in name]
        for family in ("gemma3", "gemma3n", "gemma4")
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
