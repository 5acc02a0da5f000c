"""sdpa-gqa-head-dim: with no mask, ``use_gqa_in_sdpa`` has SDPA run grouped-query attention (``enable_gqa=True``)
at any head dim, Gemma-4's 512 on its full-attention layers included (5.0.0 to 5.12.x; the gemma4 family from
5.5.0).

The oracle is transformers 5.13.0 (PR #46960), which asks for ``enable_gqa`` only at head dims up to 256 and
repeats the key/value heads above: ``tests/fixtures/sdpa_gqa_reference.json``, made by
``tests/fixtures/make_sdpa_gqa_reference.py``, records what reaches ``torch.nn.functional.scaled_dot_product_attention``
in each layer of a tiny Gemma-4 with the real head dims (256 sliding, 512 full). The tests record the installed
release the same way, with a ``TorchFunctionMode`` that observes the real call and changes nothing.

What only a CUDA GPU shows: there the flash kernel takes head dims up to 256 and the memory-efficient kernel does not
take ``enable_gqa``, so the unpatched call at 512 falls back to the math kernel, which materialises every head's
score matrix (bf16, 32 heads, 8192 tokens: 4 GiB per layer call). On this CPU-only machine SDPA runs the same kernel
either way, so the tests check the dispatch decision and that the logits do not change, not the kernel or its
memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import rewriter
from rewriter import testing

REFERENCE_FILE = Path(__file__).parent / "fixtures" / "sdpa_gqa_reference.json"
PADDING = {"no padding": None, "left padding": torch.tensor([[0, 1, 1, 1, 1, 1]])}


class SdpaCalls(TorchFunctionMode):
    """Records, without changing it, each call of torch's scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key = args[:2]
            self.calls.append(
                {
                    "head_dim": query.shape[-1],
                    "query_heads": query.shape[1],
                    "key_heads": key.shape[1],
                    "mask": kwargs.get("attn_mask") is not None,
                    "enable_gqa": kwargs.get("enable_gqa", False),
                }
            )
        return func(*args, **kwargs)


def gqa_model():
    """Gemma-4's head dims at tiny width: 256 on sliding layers, 512 on full ones, 4 query heads over 2 key/value
    heads. Six tokens fit the window of 8, so no layer gets a mask unless the prompt is padded."""
    import transformers

    torch.manual_seed(0)
    config = testing.text_config(0, head_dim=256, global_head_dim=512, attn_implementation="sdpa")
    return transformers.Gemma4ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return gqa_model()


def run(model) -> tuple[dict[str, list[dict]], dict[str, torch.Tensor]]:
    """What reaches SDPA in each layer, and the logits, for the prompt unpadded and left-padded."""
    calls, logits = {}, {}
    for name, mask in PADDING.items():
        with torch.no_grad(), SdpaCalls() as recorded:
            logits[name] = model(testing.input_ids(length=6), attention_mask=mask).logits
        calls[name] = recorded.calls
    return calls, logits


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE_FILE.read_text())


def test_unpatched_sdpa_is_asked_for_gqa_at_head_dim_512(model, reference):
    calls, _ = run(model)
    full = [call for call in calls["no padding"] if call["head_dim"] == 512]
    assert len(full) == 3 and all(call["enable_gqa"] and call["key_heads"] == 2 for call in full)
    assert calls["no padding"] != reference["calls"]["no padding"]
    assert calls["left padding"] == reference["calls"]["left padding"]  # a mask: repeated heads, in every release


def test_patched_sdpa_is_asked_as_5_13_asks_and_the_logits_do_not_change(model, reference, cache_dir):
    assert reference["transformers"] == "5.13.0"
    _, unpatched = run(model)
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    assert report.outcome("sdpa-gqa-head-dim").status == "applied"
    calls, logits = run(model)
    assert calls == reference["calls"]
    by_head_dim = {(call["head_dim"], call["enable_gqa"], call["key_heads"]) for call in calls["no padding"]}
    assert by_head_dim == {(256, True, 2), (512, False, 4)}
    for name in PADDING:
        assert torch.equal(logits[name], unpatched[name])
