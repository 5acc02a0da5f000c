"""Train a tiny KV-shared Gemma-4 or Gemma-3n text model under torch.distributed (gloo); each rank writes
OUT/rank-N.json with its losses, or the error that stopped it.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_train.py FAMILY MODE HOW CACHE_DIR OUT
    python -m torch.distributed.run --nproc-per-node 1 tests/distributed_train.py ...   # the one-process reference

FAMILY is ``gemma4`` or ``gemma3n``. MODE: ``unpatched``; ``patched`` (``rewriter.compile`` first, every rank
against the same cache folder without the shipped entries, as a job's ranks starting together do; then the model);
``patched-late`` (the model built first, so its shared layers keep the K/V weights that nothing uses, as the fix
of an earlier rewriter did). HOW, each with gradient checkpointing and no cache:

- ``trainer``: transformers' ``Trainer``, two steps; it sets DDP's ``find_unused_parameters=False``. Each rank
  gets half of the four rows; the logged loss is their mean.
- ``ddp``: plain ``DistributedDataParallel`` (every parameter and buffer broadcast from rank 0), three SGD steps,
  every rank on all four rows.
- ``fsdp2``: ``fully_shard`` on each decoder layer and on the model with ``MixedPrecisionPolicy(param_dtype=
  bfloat16)``, which casts every layer's inputs and so rebuilds plain dicts among them; two SGD steps, every rank
  on all four rows.

Each rank restarts itself with the string hash seed that ``$REWRITER_RANK_HASH_SEEDS`` (comma-separated, one per
rank) names for it, as processes of a real job get different seeds.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

seeds = os.environ.get("REWRITER_RANK_HASH_SEEDS")
if seeds:
    seed = seeds.split(",")[int(os.environ["RANK"])]
    if os.environ.get("PYTHONHASHSEED") != seed:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": seed})

import torch  # noqa: E402

import rewriter  # noqa: E402
from rewriter import testing  # noqa: E402

family, mode, how, cache_dir, out = sys.argv[1:6]
world_size = int(os.environ["WORLD_SIZE"])
rank = int(os.environ["RANK"])
ids = testing.input_ids(batch=4, length=16)


def build():
    model = testing.text_model(family).train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train_with_trainer(model) -> list[float]:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(Path(out) / "trainer"), per_device_train_batch_size=4 // world_size, max_steps=2,
        learning_rate=0.1, optim="sgd", max_grad_norm=0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, dataloader_drop_last=True,
    )
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train_with_ddp(model) -> list[float]:
    return train_steps(torch.nn.parallel.DistributedDataParallel(model), steps=3)


def train_with_fsdp2(model) -> list[float]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return train_steps(model, steps=2)


def train_steps(model, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


TRAIN = {"trainer": train_with_trainer, "ddp": train_with_ddp, "fsdp2": train_with_fsdp2}

torch.distributed.init_process_group("gloo")
result = {"rank": rank, "hash_seed": os.environ.get("PYTHONHASHSEED")}
if mode == "patched-late":
    model = build()
if mode.startswith("patched"):
    result["origin"] = rewriter.compile(family, cache_dir=cache_dir, strict=True, use_shipped=False).origin
if mode != "patched-late":
    model = build()
try:
    result["losses"] = TRAIN[how](model)
except Exception as error:  # the crash is the finding: record it for the test to read
    result["error"] = f"{type(error).__name__}: {error}"
    result["traceback"] = traceback.format_exc()
(Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
gc.collect()  # the DDP model (its reducer holds the process group) goes first: see examples/sft_text_only.py
torch.distributed.destroy_process_group()
