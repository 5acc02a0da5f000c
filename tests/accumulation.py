"""One Trainer step over the same four rows, as one batch of 4 or as 4 accumulated batches of 1.

Shared by tests/test_trainers.py, tests/release_check.py, tests/release_check_loss_accumulation.py (its Trainer
arguments) and tests/fixtures/make_accumulation_reference.py (which runs it under a release
that fixed the accumulation bugs natively), so both compute on the same weights: every parameter is drawn from one
seeded generator in name order, whatever the release's initialisation does.
"""

from __future__ import annotations

import tempfile

import torch

from rewriter import testing

ROWS = testing.input_ids(batch=4, length=12)


def seeded_model():
    """A tiny Gemma-4 multimodal model with bidirectional vision attention (31B, 26B-A4B), same weights everywhere."""
    from transformers import Gemma4ForConditionalGeneration

    config = testing.vision_config(use_bidirectional_attention="vision")
    return testing.seeded_in_name_order(Gemma4ForConditionalGeneration(config))


def one_sgd_step(batch_size: int, accumulation: int, output_dir: str):
    """``Trainer`` arguments of one plain SGD step (learning rate 0.1, no clipping) over ``batch_size`` x
    ``accumulation`` rows on the CPU, logged, nothing saved."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )


def train_one_step(batch_size: int, accumulation: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The logged loss of one SGD step with ``Trainer``, and every parameter after it."""
    from datasets import Dataset
    from transformers import Trainer

    rows = ROWS.tolist()
    all_text = [[0] * len(row) for row in rows]  # the unpatched release needs token types; patched, it does not
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows, "mm_token_type_ids": all_text})
    model = seeded_model()
    with tempfile.TemporaryDirectory(prefix="accumulation-") as output_dir:
        trainer = Trainer(model=model, args=one_sgd_step(batch_size, accumulation, output_dir), train_dataset=dataset)
        trainer.train()
    return trainer.state.log_history[0]["loss"], {name: p.detach().clone() for name, p in model.named_parameters()}


def step_summary(before, after: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Each parameter's change over the step, as (sum, norm) in float64."""
    return {
        name: ((change := after[name].double() - p.detach().double()).sum().item(), change.norm().item())
        for name, p in before.named_parameters()
    }
