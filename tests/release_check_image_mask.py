"""Run inside an environment with a transformers release: a tiny Gemma-4 with ``use_bidirectional_attention="vision"``
(window 8) on two prompts whose token types mark an image: one inside the window (positions 3-6 of 12), one longer
than it (1-12 of 16). Prints one JSON object.

    python tests/release_check_image_mask.py reference FILE     # save the logits (run with the oracle, 5.13.0)
    python tests/release_check_image_mask.py check CACHE FILE   # gaps to FILE's logits, unpatched then patched

tests/fixtures/image_mask_reference.pt was saved so, with transformers 5.13.0 (``PYTHONPATH=.`` in its environment).
The weights are drawn per parameter from a generator seeded by its name, whatever the release initialises. Used by
tests/test_image_bidirectional_mask.py; kept a plain script so that it runs under whatever transformers that
environment has.
"""

from __future__ import annotations

import json
import sys

import torch

import rewriter
from rewriter import testing

PROMPTS = {"image inside the window": (12, 3, 7), "image longer than the window": (16, 1, 13)}
IMPLEMENTATIONS = ("eager", "sdpa")


def model(implementation: str):
    from transformers import Gemma4ForConditionalGeneration

    config = testing.vision_config(use_bidirectional_attention="vision")
    config._attn_implementation = implementation
    return testing.seeded(Gemma4ForConditionalGeneration(config))


def logits() -> dict[str, torch.Tensor]:
    """``"IMPLEMENTATION: PROMPT"`` -> logits."""
    result = {}
    for implementation in IMPLEMENTATIONS:
        built = model(implementation)
        for prompt, (length, start, end) in PROMPTS.items():
            ids = testing.input_ids(length=length)
            token_types = torch.zeros_like(ids)
            token_types[:, start:end] = 1
            with torch.no_grad():
                result[f"{implementation}: {prompt}"] = built(input_ids=ids, mm_token_type_ids=token_types).logits
    return result


def gaps(reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: (value - reference[name]).abs().max().item() for name, value in logits().items()}


def main(mode: str, *args: str) -> None:
    import transformers

    if mode == "reference":
        torch.save({"transformers": transformers.__version__, "logits": logits()}, args[0])
        return
    cache, path = args
    reference = torch.load(path)
    result = {"transformers": transformers.__version__, "oracle": reference["transformers"], "unpatched": gaps(reference["logits"])}
    report = rewriter.compile("gemma4", cache_dir=cache, strict=True)
    outcome = report.outcome("image-bidirectional-mask")
    result["outcome"] = [outcome.status, outcome.sites]
    result["patched"] = gaps(reference["logits"])
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
