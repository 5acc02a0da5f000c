"""router-softmax-float32: the Gemma-4 MoE router (26B-A4B) takes its softmax, top-k and weight normalisation in
the model's dtype, so in bfloat16 the routing weights are rounded and some tokens pick other experts (5.5.0 to
5.12.x).

The oracle is transformers 5.13.0, which takes the softmax in float32 (``tests/fixtures/router_reference.pt``, made
by ``tests/fixtures/make_router_reference.py``): the same bfloat16 router weights and input, routed there. The test
environment's router, unpatched, routes differently; patched, it routes exactly as 5.13.0 does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rewriter
from rewriter import testing

REFERENCE = Path(__file__).parent / "fixtures" / "router_reference.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(REFERENCE)


def route(reference: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The installed release's ``Gemma4TextRouter`` on the reference's bfloat16 weights and input."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    config = testing.text_config(0, enable_moe_block=True, moe_intermediate_size=32, **reference["config"])
    router = Gemma4TextRouter(config).to(torch.bfloat16).eval()
    router.load_state_dict(reference["state_dict"])
    with torch.no_grad():
        return router(reference["hidden_states"])


def experts(index: torch.Tensor) -> torch.Tensor:
    """Each token's chosen experts, as a sorted set."""
    return index.sort(dim=-1).values


def test_unpatched_bfloat16_router_weighs_and_picks_experts_unlike_5_13(reference):
    assert reference["transformers"] == "5.13.0"
    probabilities, weights, index = route(reference)
    assert probabilities.dtype == weights.dtype == torch.bfloat16
    other_experts = (experts(index) != experts(reference["top_k_index"])).any(dim=-1)
    assert other_experts.sum() >= 3  # 4 of the 64 tokens
    same = (index == reference["top_k_index"]).all(dim=-1)
    assert (weights.float() - reference["top_k_weights"])[same].abs().max() > 1e-3  # 1.3e-3


def test_patched_router_routes_exactly_as_5_13(reference, cache_dir):
    report = rewriter.compile("gemma4", cache_dir=cache_dir, strict=True)
    assert report.outcome("router-softmax-float32").status == "applied"
    probabilities, weights, index = route(reference)
    assert probabilities.dtype == weights.dtype == torch.float32
    assert torch.equal(index, reference["top_k_index"])
    assert torch.equal(weights, reference["top_k_weights"])
