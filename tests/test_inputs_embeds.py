"""per-layer-inputs-from-embeds: a forward given ``inputs_embeds`` alone (``generate(inputs_embeds=...)``, prompt
tuning) gets the per-layer token embeddings of the tokens it embeds.

No release fixes it (5.25.0 included), so the oracle is the path upstream gets right on the same weights: the same
tokens given as ``input_ids``. Gemma-4 in bfloat16 raises unpatched (its reverse lookup scales by the exact
``sqrt(hidden_size)``, the embedding by that number rounded to bfloat16: hidden 96 tells them apart); Gemma-3n
silently leaves the per-layer embeddings out. The memory of the lookup at E2B's vocabulary is measured by
``benchmarks/inputs_embeds_bench.py``.
"""

from __future__ import annotations

import pytest
import torch

import rewriter
from rewriter import testing

DTYPES = [torch.float32, torch.bfloat16]


def logits_both_ways(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = testing.input_ids(batch=2, length=12)
    with torch.no_grad():
        return model(input_ids=ids).logits, model(inputs_embeds=model.get_input_embeddings()(ids)).logits


@pytest.fixture
def patched(cache_dir):
    return {family: rewriter.compile(family, cache_dir=cache_dir, strict=True) for family in ("gemma4", "gemma3n")}


def test_unpatched_gemma4_in_bfloat16_finds_no_token():
    with pytest.raises(RuntimeError, match="do not exactly match the embedding weights"):
        logits_both_ways(testing.per_layer_inputs_model("gemma4", torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpatched_gemma3n_leaves_the_per_layer_embeddings_out(dtype):
    by_ids, by_embeddings = logits_both_ways(testing.per_layer_inputs_model("gemma3n", dtype))
    assert (by_ids.float() - by_embeddings.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_patched_inputs_embeds_give_the_logits_of_input_ids(patched, family, dtype):
    assert patched[family].outcome("per-layer-inputs-from-embeds").status == "applied"
    by_ids, by_embeddings = logits_both_ways(testing.per_layer_inputs_model(family, dtype))
    assert torch.equal(by_ids, by_embeddings)


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_patched_generate_from_inputs_embeds_gives_the_tokens_of_input_ids(patched, family):
    built, ids = testing.per_layer_inputs_model(family), testing.input_ids(length=8)
    by_ids = built.generate(ids, max_new_tokens=6, do_sample=False)[:, ids.shape[1] :]
    by_embeddings = built.generate(inputs_embeds=built.get_input_embeddings()(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(by_embeddings, by_ids)


def test_patched_vectors_of_no_token_still_raise_in_gemma4_and_take_token_0_in_gemma3n(patched):
    ids = testing.input_ids(length=6)
    gemma4, gemma3n = testing.per_layer_inputs_model("gemma4"), testing.per_layer_inputs_model("gemma3n")
    with torch.no_grad():
        soft = gemma4.get_input_embeddings()(ids)
        soft[0, 2] += 0.5  # a learned soft prompt, say: no row of the table
        with pytest.raises(RuntimeError, match="do not exactly match the embedding weights"):
            gemma4(inputs_embeds=soft)
        soft = gemma3n.get_input_embeddings()(ids)
        soft[0, 2] += 0.5
        per_layer = gemma3n.model.get_per_layer_inputs(torch.where(torch.arange(6) == 2, 0, ids))
        expected = gemma3n(inputs_embeds=soft, per_layer_inputs=per_layer).logits
        torch.testing.assert_close(gemma3n(inputs_embeds=soft).logits, expected, rtol=0, atol=0)


def test_the_lookup_holds_under_a_bfloat16_default_dtype_at_e2b_width(patched):
    """Users often set the default dtype; the lookup's own index arithmetic must not follow it."""
    from transformers.models.gemma4 import modeling_gemma4

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        embedding = modeling_gemma4.Gemma4TextScaledWordEmbedding(300, 1536, 0, embed_scale=1536**0.5)
        ids = testing.input_ids(batch=2, length=5)
        found = modeling_gemma4.token_ids_of_embeddings(embedding(ids), embedding)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(found, ids)
