"""Run inside an environment with some transformers release: one Trainer step over the same four rows, as one batch
of 4 or as 4 accumulated batches of 1, on a tiny Gemma-3 or Gemma-3n multimodal model, before and after compile.

    python tests/release_check_loss_accumulation.py CACHE_DIR FAMILY      # prints one JSON object

Used by tests/test_loss_accumulation.py, one virtual environment per release, 4.x included; kept a plain script so that it
runs under whatever transformers that environment has. Every parameter is drawn from one seeded generator in name
order (as tests/accumulation.py does), so that every release starts from the same weights; "weights" names them.
"""

from __future__ import annotations

import json
import sys
import tempfile

# The test environment's datasets needs huggingface_hub 1.x, which a 4.x release replaces with 0.x in its virtual
# environment: hide it, or importing Trainer fails. The rows go to Trainer as a plain list.
sys.modules["datasets"] = None

from accumulation import one_sgd_step  # tests/, this script's folder

import rewriter
from rewriter import testing

ROWS = testing.input_ids(batch=4, length=12).tolist()


def seeded_model(family: str):
    import transformers

    if family == "gemma3n":  # text-only training calls neither tower
        # without KV sharing, so that kv-sharing-without-cache does not change the logits
        config = testing.gemma3n_config(num_kv_shared_layers=0)
        model = testing.gemma3n_multimodal(config, "gemma3n_vision", "gemma3n_audio")
    else:
        model = transformers.Gemma3ForConditionalGeneration(testing.gemma3_vision_config())
    return testing.seeded_in_name_order(model)


def train_one_step(family: str, batch_size: int, accumulation: int) -> dict:
    """The loss ``Trainer`` logs for one SGD step (4.x rounds it to 4 places), the same loss unrounded (the sum of
    what each micro-batch's ``training_step`` returned), and every parameter after the step."""
    from transformers import Trainer

    model = seeded_model(family)
    output_dir = tempfile.TemporaryDirectory(prefix="accumulation-")
    args = one_sgd_step(batch_size, accumulation, output_dir.name)
    # Gemma-3's token types, all text: 5.0.0 to 5.5.4 refuse to train without them (text-only-training)
    types = {"token_type_ids": [0] * len(ROWS[0])} if family == "gemma3" else {}
    rows = [{"input_ids": row, "labels": row, **types} for row in ROWS]
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    losses, training_step = [], trainer.training_step

    def recorded_step(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.append(loss.detach().double().item())
        return loss

    trainer.training_step = recorded_step
    with output_dir:
        trainer.train()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {
        "logged": trainer.state.log_history[0]["loss"],
        "loss": sum(losses),
        "accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
        "after": after,
    }


def compare(family: str) -> dict:
    whole, accumulated = train_one_step(family, 4, 1), train_one_step(family, 1, 4)
    return {
        "whole": whole["loss"],
        "accumulated": accumulated["loss"],
        "whole_logged": whole["logged"],
        "accumulated_logged": accumulated["logged"],
        "accepts_loss_kwargs": [whole["accepts_loss_kwargs"], accumulated["accepts_loss_kwargs"]],
        "weight_gap": max((whole["after"][n] - accumulated["after"][n]).abs().max().item() for n in whole["after"]),
    }


def patch(family: str, cache_dir: str) -> list:
    """Compile ``family``; its ``loss-accumulation`` outcome."""
    report = rewriter.compile(family, cache_dir=cache_dir, strict=True)
    outcome = report.outcome("loss-accumulation")
    return [report.origin, outcome.status, outcome.sites]


def main(cache_dir: str, family: str) -> dict:
    import transformers

    weights = testing.weights_digest(seeded_model(family))
    result = {"transformers": transformers.__version__, "family": family, "weights": weights}
    result["unpatched"] = compare(family)
    result["origin"], *outcome = patch(family, cache_dir)
    result["outcome"] = outcome
    result["patched"] = compare(family)
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
