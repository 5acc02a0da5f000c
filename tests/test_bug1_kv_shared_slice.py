"""Bug 1: ``layer_types[: -n]`` with ``n == 0`` builds caches without layers (Gemma-4 31B, 26B-A4B)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from rewriter import testing

LAYER_TYPES = ["sliding_attention", "full_attention"] * 3


def generate(model, **kwargs) -> torch.Tensor:
    return model.generate(testing.input_ids(), max_new_tokens=10, do_sample=False, **kwargs)


def test_unpatched_static_cache_has_no_layers_and_generate_crashes():
    model = testing.causal_lm(0)
    assert StaticCache(config=model.config, max_cache_len=32).layers == []
    with pytest.raises(IndexError, match="list index out of range"):
        generate(model, cache_implementation="static")


def test_unpatched_dynamic_cache_drops_its_sliding_layers():
    assert DynamicCache(config=testing.text_config(0)).layers == []


def test_static_cache_generate_matches_dynamic_cache(patched):
    model = testing.causal_lm(0)
    static = generate(model, cache_implementation="static")
    assert static.shape == (1, 22)
    assert torch.equal(static, generate(model))


def test_caches_get_one_layer_per_layer_type(patched):
    config = testing.text_config(0)
    dynamic = DynamicCache(config=config).layers
    static = StaticCache(config=config, max_cache_len=32).layers
    assert [type(layer) for layer in dynamic] == [DynamicSlidingWindowLayer, DynamicLayer] * 3
    assert [type(layer) for layer in static] == [StaticSlidingWindowLayer, StaticLayer] * 3


def test_sliding_layers_keep_only_the_window(patched):
    """After 16 + 100 tokens each sliding layer holds window - 1 positions, the full layers everything."""
    model = testing.causal_lm(0)
    cache = DynamicCache(config=model.config)
    model.generate(testing.input_ids(length=16), max_new_tokens=100, min_new_tokens=100, past_key_values=cache)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [7, 115] * 3


@pytest.mark.parametrize("shared", [1, 2])
def test_a_positive_count_still_trims_the_shared_layers(patched, shared):
    config = testing.text_config(shared)
    assert len(DynamicCache(config=config).layers) == 6 - shared
    assert len(StaticCache(config=config, max_cache_len=32).layers) == 6 - shared
