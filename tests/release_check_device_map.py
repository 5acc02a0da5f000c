"""Run inside an environment with a transformers release: tiny Gemma-4 and Gemma-3n models with KV-shared layers
loaded with a ``device_map`` that offloads one decoder layer to disk, so that accelerate hooks every layer (as a
model split over several GPUs has them). Prints one JSON object.

    python tests/release_check_device_map.py CACHE_DIR FAMILY...

Per family, unpatched then patched (``rewriter.compile(FAMILY)``): the error of a dispatched forward, or the gap of
its logits to the same weights' undispatched forward (``use_cache`` True and False), and whether greedy
``generate`` gives the undispatched tokens. Used by tests/test_device_map.py; kept a plain script so that it runs
under whatever transformers that environment has.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

import rewriter
from rewriter import testing


def dispatched(model, folder: str):
    """``model`` saved and loaded back with its first decoder layer on disk, the rest on the CPU."""
    model.save_pretrained(folder)
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map |= {f"model.layers.{index}": "cpu" for index in range(len(model.model.layers))}
    device_map |= {"model.layers.0": "disk", "lm_head": "cpu"}
    return type(model).from_pretrained(folder, device_map=device_map, offload_folder=f"{folder}/offload").eval()


def check(family: str) -> dict:
    model, ids = testing.text_model(family), testing.input_ids(length=10)
    result = {}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        loaded = dispatched(model, folder)
        for use_cache in (True, False):
            try:
                logits = loaded(ids, use_cache=use_cache).logits
            except Exception as error:  # noqa: BLE001 - the crash is what is measured
                result[f"use_cache={use_cache}"] = f"{type(error).__name__}: {error}"
                continue
            result[f"use_cache={use_cache}"] = (logits - model(ids, use_cache=use_cache).logits).abs().max().item()
        try:
            tokens = loaded.generate(ids, max_new_tokens=4, do_sample=False)
            result["generate_equal"] = torch.equal(tokens, model.generate(ids, max_new_tokens=4, do_sample=False))
        except Exception as error:  # noqa: BLE001
            result["generate_equal"] = f"{type(error).__name__}: {error}"
    return result


def main(cache: str, *families: str) -> None:
    import transformers

    result = {"transformers": transformers.__version__, "unpatched": {}, "patched": {}, "outcomes": {}}
    for family in families:
        result["unpatched"][family] = check(family)
    for family in families:
        report = rewriter.compile(family, cache_dir=cache, strict=True)
        result["outcomes"][family] = report.outcome("kv-sharing-fsdp2").status
        result["patched"][family] = check(family)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
