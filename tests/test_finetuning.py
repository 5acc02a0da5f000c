"""The fine-tuning path as users run it: QLoRA with peft and bitsandbytes on the CPU, a pre-quantized vision
checkpoint, ``torchrun`` with DDP, and the model round trips that proxy-based fixes broke."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from transformers import BitsAndBytesConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

from rewriter import testing
from tests.conftest import ROOT, run_python

sys.path.insert(0, str(ROOT / "examples"))
from qlora_cpu import QLORA_WIDTHS, load_for_qlora  # noqa: E402

SHAPE_ERROR = "mat1 and mat2 shapes cannot be multiplied"


@pytest.fixture(scope="module")
def kv_shared_checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("kv-shared")
    torch.manual_seed(0)
    Gemma4ForCausalLM(testing.text_config(2, **QLORA_WIDTHS)).save_pretrained(folder)
    return str(folder)


def cached_loss_and_training(checkpoint: str, steps: int) -> tuple[float, list[float]]:
    """The loss of a batch computed with a cache (the oracle), then the losses of QLoRA steps on it."""
    model = load_for_qlora(checkpoint)
    batch = testing.input_ids(batch=2, length=16)
    model.eval()
    with torch.no_grad():
        oracle = model(input_ids=batch, labels=batch, use_cache=True).loss.item()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return oracle, losses


def test_unpatched_qlora_trains_on_another_loss_than_the_model_computes(kv_shared_checkpoint):
    oracle, (first,) = cached_loss_and_training(kv_shared_checkpoint, steps=1)
    assert abs(first - oracle) > 1e-3


def test_qlora_first_step_loss_is_the_cached_loss_and_training_lowers_it(kv_shared_checkpoint, patched):
    oracle, losses = cached_loss_and_training(kv_shared_checkpoint, steps=4)
    assert losses[0] == oracle
    assert losses[-1] < losses[0] - 0.1


@pytest.fixture(scope="module")
def prequantized_vision_checkpoint(tmp_path_factory) -> str:
    """A tiny multimodal model quantized to 4 bits with its vision tower, saved, and then given the skip list
    of a user who keeps the patch embedder out of bitsandbytes: its packed weight lands on a bare linear."""
    floats, packed = tmp_path_factory.mktemp("float"), tmp_path_factory.mktemp("4bit")
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(testing.vision_config(patch_size=8, **QLORA_WIDTHS)).save_pretrained(floats)
    quantization = BitsAndBytesConfig(load_in_4bit=True)
    Gemma4ForConditionalGeneration.from_pretrained(floats, quantization_config=quantization, device_map="cpu").save_pretrained(packed)
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "model.vision_tower.patch_embedder"]
    (packed / "config.json").write_text(json.dumps(config))
    return str(packed)


def image_and_text_forward(checkpoint: str):
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, device_map="cpu").eval()
    pixels, positions = testing.image_patches(patch_size=8)
    with torch.no_grad():
        return model, model(input_ids=testing.image_prompt(), pixel_values=pixels, image_position_ids=positions)


def test_unpatched_prequantized_vision_checkpoint_raises_the_shape_error(prequantized_vision_checkpoint):
    with pytest.raises(RuntimeError, match=SHAPE_ERROR):
        image_and_text_forward(prequantized_vision_checkpoint)


def test_prequantized_vision_checkpoint_runs_and_input_proj_is_the_dequantized_linear(
    prequantized_vision_checkpoint, patched
):
    model, output = image_and_text_forward(prequantized_vision_checkpoint)
    assert output.logits.shape == (1, testing.image_prompt().shape[1], 256)
    assert torch.isfinite(output.logits).all()
    input_proj = model.model.vision_tower.patch_embedder.input_proj
    weight = input_proj.weight
    assert weight.dtype == torch.uint8 and weight.quant_state is not None  # still packed, as loaded
    x = 2 * (testing.image_patches(patch_size=8)[0] - 0.5)
    dequantized = dequantize_4bit(weight, weight.quant_state)
    assert torch.equal(input_proj(x), F.linear(x.to(dequantized.dtype), dequantized))


def test_resize_save_load_and_generate_after_training(patched, tmp_path):
    model = testing.causal_lm(2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = testing.input_ids(batch=2, length=16)
    for _ in range(2):
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.gradient_checkpointing_disable()
    model.eval()
    model.resize_token_embeddings(264)
    model.save_pretrained(tmp_path / "trained")
    reloaded = Gemma4ForCausalLM.from_pretrained(tmp_path / "trained").eval()
    ids = testing.input_ids()
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape[-1] == 264
        assert torch.equal(reloaded(ids, use_cache=True).logits, logits)
        assert torch.equal(reloaded(ids, use_cache=False).logits, logits)
    generated = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.generate(ids, max_new_tokens=8, do_sample=False))


def test_the_example_script_trains_and_generates(tmp_path):
    result = run_python("", str(ROOT / "examples" / "qlora_cpu.py"), "--steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "kv-sharing-without-cache applied" in result.stdout and "generated: [" in result.stdout
