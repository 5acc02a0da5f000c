"""Bug 3: a bitsandbytes 4-bit packed weight on the bare ``Gemma4VisionPatchEmbedder.input_proj`` crashes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from bitsandbytes.nn import Params4bit
from transformers import Gemma4ForConditionalGeneration
from transformers.models.gemma4 import modeling_gemma4

from rewriter import testing

SHAPE_ERROR = "mat1 and mat2 shapes cannot be multiplied"


def packed(weight: torch.Tensor) -> Params4bit:
    data, state = quantize_4bit(weight.detach().to(torch.bfloat16))
    return Params4bit(data, requires_grad=False, quant_state=state, bnb_quantized=True)


def vision_model() -> Gemma4ForConditionalGeneration:
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(testing.vision_config()).eval()


def test_unpatched_bare_linear_with_packed_weight_raises_the_shape_error():
    linear = torch.nn.Linear(48, 64, bias=False)
    linear.weight = packed(torch.randn(64, 48))
    with pytest.raises(RuntimeError, match=SHAPE_ERROR):
        linear(torch.randn(3, 48))


def test_unpatched_vision_tower_with_packed_input_proj_raises():
    model = vision_model()
    model.model.vision_tower.patch_embedder.input_proj.weight = packed(torch.randn(64, 48))
    with pytest.raises(RuntimeError, match=SHAPE_ERROR), torch.no_grad():
        model.model.get_image_features(*testing.image_patches())


def test_packed_weight_is_dequantized_before_the_matmul(patched):
    weight = packed(torch.randn(64, 48))
    linear = modeling_gemma4.Gemma4DequantizingLinear(48, 64, bias=False)
    linear.weight = weight
    x = torch.randn(3, 48)
    expected = F.linear(x.to(torch.bfloat16), dequantize_4bit(weight, weight.quant_state))
    assert torch.equal(linear(x), expected)


def test_float_weight_takes_the_plain_path(patched):
    torch.manual_seed(0)
    linear = modeling_gemma4.Gemma4DequantizingLinear(48, 64, bias=True)
    x = torch.randn(3, 48)
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_clipping_works_as_in_the_clippable_linear(patched):
    linear = modeling_gemma4.Gemma4DequantizingLinear(4, 2, bias=False, use_clipped_linears=True)
    linear.weight.data = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 0.0, 0.0, 0.0]])
    linear.input_max.fill_(0.5)
    linear.output_min.fill_(-0.25)
    assert linear(torch.ones(1, 4)).tolist() == [[2.0, -0.25]]


def test_bitsandbytes_is_imported_only_for_a_packed_weight(cache_dir):
    """In a fresh process: compile and run the vision tower with float weights, and bitsandbytes stays unloaded."""
    from tests.conftest import run_python

    code = f"""
import sys, torch, rewriter
from rewriter import testing
rewriter.compile("gemma4", cache_dir={str(cache_dir)!r})
from transformers import Gemma4ForConditionalGeneration
model = Gemma4ForConditionalGeneration(testing.vision_config()).eval()
with torch.no_grad():
    model.model.get_image_features(*testing.image_patches())
assert "bitsandbytes" not in sys.modules, "bitsandbytes was imported"
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_vision_tower_runs_with_a_packed_input_proj_and_matches_the_dequantized_model(patched):
    """The reference holds the dequantized weight as a plain bf16 parameter: the same numbers, no packing."""
    model, reference = vision_model(), vision_model()
    weight = packed(model.model.vision_tower.patch_embedder.input_proj.weight)
    model.model.vision_tower.patch_embedder.input_proj.weight = weight
    dequantized = torch.nn.Parameter(dequantize_4bit(weight, weight.quant_state), requires_grad=False)
    reference.model.vision_tower.patch_embedder.input_proj.weight = dequantized
    pixels, positions = testing.image_patches()
    with torch.no_grad():
        features = model.model.get_image_features(pixels, positions).pooler_output
        expected = reference.model.get_image_features(pixels, positions).pooler_output
    assert features.shape == (4, 64)
    assert torch.equal(features, expected)


def test_state_dict_keys_are_unchanged(patched):
    keys = set(vision_model().state_dict())
    assert "model.vision_tower.patch_embedder.input_proj.weight" in keys
    from rewriter import restore

    restore("gemma4")
    assert set(vision_model().state_dict()) == keys
