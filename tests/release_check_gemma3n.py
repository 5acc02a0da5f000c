"""Run inside an environment with some transformers release: Gemma-3n's KV sharing before and after compile,
against the logits, tokens, loss and gradients of transformers 5.24.0 on the same weights (the oracle fixture).

    python tests/release_check_gemma3n.py CACHE_DIR      # prints one JSON object

Used by tests/test_releases.py, one virtual environment per release, 4.x included; kept a plain script so that it
runs under whatever transformers that environment has.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import libcst
import torch
from release_check import definition_text  # tests/, this script's folder

import rewriter
from rewriter import testing
from rewriter.rules.kv_sharing_fsdp2 import KVSharingFSDP2Rule
from rewriter.rules.per_layer_inputs_from_embeds import PerLayerInputsFromEmbedsRule
from rewriter.rules.rotary_compute_order import RotaryComputeOrderRule

REFERENCE = torch.load(Path(__file__).with_name("fixtures") / "gemma3n_kv_sharing_reference.pt", weights_only=True)
IDS = REFERENCE["input_ids"]


def oracle_weights_model():
    model = testing.text_model("gemma3n")
    model.load_state_dict(REFERENCE["state_dict"], strict=False)  # the oracle has no K/V projections in shared layers
    return model


def logits(model, train: bool = False, **kwargs) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def gaps(model) -> dict:
    """max |logits - oracle| with a cache, without one, and in train mode with no ``use_cache`` argument."""
    return {
        "cached": gap(logits(model, use_cache=True), REFERENCE["logits"]),
        "uncached": gap(logits(model, use_cache=False), REFERENCE["logits"]),
        "train": gap(logits(model, train=True), REFERENCE["logits"]),
    }


def main(cache_dir: str) -> dict:
    import transformers

    stock = oracle_weights_model()
    unpatched = gaps(stock)
    checkpoint = Path(cache_dir) / "stock-checkpoint"
    stock.save_pretrained(checkpoint)  # with the shared layers' own K/V weights, as checkpoints have them
    report = rewriter.compile("gemma3n", cache_dir=cache_dir, strict=True)
    from transformers.models.gemma3n import modeling_gemma3n

    model = oracle_weights_model()
    cached = logits(model, use_cache=True)
    result = {
        "transformers": transformers.__version__,
        "origin": report.origin,
        "outcomes": {outcome.rule: [outcome.status, outcome.sites] for outcome in report.outcomes},
        "unpatched": unpatched,
        "patched": gaps(model),
        "uncached_equals_cached": torch.equal(logits(model, use_cache=False), cached),
        "train_equals_cached": torch.equal(logits(model, train=True), cached),
        # patched, shared layers build no K/V weights, and loading a checkpoint that has them drops them silently
        "state_dict_keys_are_the_oracles": model.state_dict().keys() == REFERENCE["state_dict"].keys(),
        "unexpected_keys_on_load": sorted(type(model).from_pretrained(checkpoint, output_loading_info=True)[1]["unexpected_keys"]),
    }

    model.eval()
    caches = [None, "static"] + (["hybrid"] if hasattr(transformers, "HybridCache") else [])
    result["generate_equals_oracle"] = {
        str(cache): torch.equal(
            model.generate(IDS, max_new_tokens=8, do_sample=False, cache_implementation=cache), REFERENCE["generated"]
        )
        for cache in caches
    }

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = model(IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    result["checkpointed_loss_gap"] = abs(loss.item() - REFERENCE["loss"].item())
    result["grads_of_oracle_parameters"] = sorted(grads) == sorted(REFERENCE["grads"])
    result["grad_gap"] = max(  # each gradient's distance to the oracle's, relative to the oracle's norm
        ((grads[name] - reference).norm() / max(reference.norm(), 1e-6)).item()
        for name, reference in REFERENCE["grads"].items()
        if name in grads
    )

    # Where the rule is not needed, what it would touch must be upstream's code, byte for byte.
    unchanged = {}
    if report.outcome("kv-sharing-without-cache").status == "not_needed":
        target = "models/gemma3n/modeling_gemma3n.py"
        package = Path(transformers.__file__).parent
        patched = rewriter.patched_source("gemma3n", target)
        upstream = (package / target).read_text()
        attention = inspect.unwrap(modeling_gemma3n.Gemma3nTextAttention.forward)
        unchanged["Gemma3nTextAttention"] = (
            definition_text(patched, "Gemma3nTextAttention") == definition_text(upstream, "Gemma3nTextAttention")
            and attention.__code__.co_filename == str(package / target)
        )
        # rotary-compute-order, per-layer-inputs-from-embeds and, until 5.8.1, kv-sharing-fsdp2 rewrite the model's
        # forward in these releases: the model differs by their changes alone
        expected = libcst.parse_module(upstream)
        for rule in (RotaryComputeOrderRule, KVSharingFSDP2Rule, PerLayerInputsFromEmbedsRule):
            expected = rule().apply(expected)[0]
        model = "Gemma3nTextModel"
        unchanged[model] = definition_text(patched, model) == definition_text(expected.code, model)
    result["unchanged_where_not_needed"] = unchanged
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
