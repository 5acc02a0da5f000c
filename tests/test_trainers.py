"""Fine-tuning with the trainers people use: TRL's SFTTrainer on text-only data (Gemma-4 and Gemma-3), Trainer with
gradient accumulation, and a float16 vision tower. Each bug is shown on the unpatched release, then gone.

The accumulation oracle is transformers 5.6.0, which fixed both accumulation bugs natively:
``fixtures/accumulation_reference.pt`` (``fixtures/make_accumulation_reference.py`` regenerates it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig, Gemma3ForConditionalGeneration, Gemma4ForConditionalGeneration
from trl import SFTConfig, SFTTrainer

import rewriter
from rewriter import testing
from tests.accumulation import seeded_model, step_summary, train_one_step
from tests.conftest import ROOT, run_python

REFERENCE = torch.load(Path(__file__).with_name("fixtures") / "accumulation_reference.pt", weights_only=True)
# Sized for bitsandbytes on the CPU: every quantized linear 64 wide or more, outputs a multiple of 32.
QLORA_WIDTHS = dict(
    hidden_size=128, intermediate_size=256, head_dim=32, global_head_dim=64, hidden_size_per_layer_input=64
)
# LoRA on the text layers (Gemma-4's vision tower has its own clippable linears, which peft does not wrap).
LANGUAGE_MODEL_ATTENTION = r".*language_model.*\.(q_proj|v_proj)"
MULTIMODAL = {
    # family: the model class, its config (text-only batches raise), the input its mask builder requires
    "gemma4": (
        Gemma4ForConditionalGeneration,
        lambda: testing.vision_config(patch_size=8, use_bidirectional_attention="vision", **QLORA_WIDTHS),
        "mm_token_type_ids",
    ),
    "gemma3": (Gemma3ForConditionalGeneration, testing.gemma3_vision_config, "token_type_ids"),
}


@pytest.fixture(scope="module", params=list(MULTIMODAL))
def checkpoint(request, tmp_path_factory) -> tuple[str, str]:
    model_class, config, _ = MULTIMODAL[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model_class(config()).save_pretrained(folder)
    return request.param, str(folder)


def sft_trainer(model, output_dir: Path, peft_config=None, **arguments) -> SFTTrainer:
    """TRL's SFTTrainer on a text-only dataset, as a tokenizer makes it: no token types."""
    args = SFTConfig(
        output_dir=str(output_dir), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, **arguments
    )
    dataset = Dataset.from_dict({"text": testing.sentences()})
    return SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=testing.word_tokenizer(), peft_config=peft_config
    )


def load(family: str, folder: str, **kwargs):
    return MULTIMODAL[family][0].from_pretrained(folder, device_map="cpu", **kwargs)


def test_unpatched_sft_on_text_only_data_raises(checkpoint, tmp_path):
    family, folder = checkpoint
    trainer = sft_trainer(load(family, folder), tmp_path, max_steps=1, per_device_train_batch_size=2)
    with pytest.raises(ValueError, match=f"`{MULTIMODAL[family][2]}` is required as a model input when training"):
        trainer.train()


def test_a_text_only_batch_is_masked_as_all_text(checkpoint, cache_dir):
    """No token types means all text: the same logits as token types that mark every token as text."""
    family, folder = checkpoint
    rewriter.compile(family, cache_dir=cache_dir, strict=True)
    model = load(family, folder).train()  # train mode: where the check was; dropout is 0
    ids = testing.input_ids(batch=2, length=12)
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
        all_text = model(input_ids=ids, **{MULTIMODAL[family][2]: torch.zeros_like(ids)}).logits
    assert torch.equal(text_only, all_text)


def test_sft_trains_lora_adapters_on_a_4bit_model_with_text_only_data(checkpoint, cache_dir, tmp_path):
    family, folder = checkpoint
    report = rewriter.compile(family, cache_dir=cache_dir, strict=True)
    assert report.outcome("text-only-training").status == "applied"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = load(family, folder, quantization_config=quantization)
    assert any(type(module).__name__ == "Linear4bit" for module in model.modules())
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_ATTENTION)
    trainer = sft_trainer(
        model, tmp_path, peft_config=lora, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-2,
    )
    adapters = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert adapters and all("lora_" in name for name in adapters)
    trained = dict(trainer.model.named_parameters())
    assert any(not torch.equal(trained[name], before) for name, before in adapters.items())


def test_unpatched_trainer_logs_the_loss_times_the_accumulation_steps():
    whole, _ = train_one_step(batch_size=4, accumulation=1)
    accumulated, _ = train_one_step(batch_size=1, accumulation=4)
    assert accumulated == pytest.approx(4 * whole, rel=1e-5)


def test_accumulated_step_equals_one_batch_and_transformers_5_6(patched):
    """Same logged loss and same weights after the step, and both as transformers 5.6.0 computes them."""
    assert patched.outcome("loss-accumulation").status == "applied"
    whole, after_whole = train_one_step(batch_size=4, accumulation=1)
    accumulated, after_accumulated = train_one_step(batch_size=1, accumulation=4)
    assert accumulated == pytest.approx(whole, abs=1e-5)
    for name, weight in after_whole.items():
        torch.testing.assert_close(after_accumulated[name], weight, rtol=0, atol=1e-6)
    assert whole == pytest.approx(REFERENCE["loss"], abs=1e-5)
    step = step_summary(seeded_model(), after_accumulated)
    assert step.keys() == REFERENCE["step"].keys()
    for name, (total, norm) in step.items():
        assert (total, norm) == pytest.approx(REFERENCE["step"][name], rel=1e-4, abs=1e-6), name


@pytest.fixture(scope="module")
def overflowing_vision():
    """The float16 model, its input, and the float32 features as the reference."""
    model = testing.overflowing_vision_model()
    pixels, positions = testing.image_patches()
    with torch.no_grad():
        reference = model.model.get_image_features(pixels, positions).pooler_output
    return model.half(), pixels.half(), positions, reference


def float16_image_features(model, pixels, positions) -> torch.Tensor:
    with torch.no_grad():
        return model.model.get_image_features(pixels, positions).pooler_output


def test_unpatched_float16_vision_features_are_nan(overflowing_vision):
    model, pixels, positions, _ = overflowing_vision
    assert float16_image_features(model, pixels, positions).isnan().any()


def test_float16_vision_features_are_finite_and_close_to_float32(overflowing_vision, patched):
    model, pixels, positions, reference = overflowing_vision
    features = float16_image_features(model, pixels, positions)
    assert features.dtype == torch.float16 and torch.isfinite(features).all()
    # float16 keeps 11 bits: the error of the overflowing activations it rounds, carried through standardization
    torch.testing.assert_close(features.float(), reference, rtol=0, atol=5e-3)


def example_losses(result) -> list[float]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step ")]


def test_the_sft_example_trains_alone_and_under_torchrun_with_the_same_loss(tmp_path):
    """The same global batch of 4 rows: 2 rows x 2 accumulated in one process, 1 x 2 in each of 2 processes."""
    script = str(ROOT / "examples" / "sft_text_only.py")
    alone = run_python("", script, "--steps", "1", "--batch", "2", "--accumulation", "2", cwd=tmp_path)
    assert "text-only-training applied" in alone.stdout and "world size 1" in alone.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script, "--steps", "1"]
    torchrun += ["--batch", "1"]
    distributed = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "world size 2" in distributed.stdout
    assert example_losses(distributed) == pytest.approx(example_losses(alone), rel=1e-6)
