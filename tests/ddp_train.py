"""A few DDP steps of the tiny KV-shared model with gradient checkpointing; each rank writes OUT/rank-N.json.

    python -m torch.distributed.run --nproc-per-node 4 tests/ddp_train.py patched|unpatched CACHE_DIR OUT  # gloo
    python tests/ddp_train.py patched|unpatched CACHE_DIR OUT                                            # one process

Each rank restarts itself with the string hash seed that ``$REWRITER_RANK_HASH_SEEDS`` (comma-separated, one per
rank) names for it, as processes of a real job get different seeds. Patched, every rank calls
``rewriter.compile("gemma4")`` at start-up against the same (empty) cache folder, as a ``torchrun`` job does.
Every rank trains on the same batch, so the losses must equal the single-process ones. Plain DDP: every
parameter and buffer is broadcast from rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

seeds = os.environ.get("REWRITER_RANK_HASH_SEEDS")
if seeds and "RANK" in os.environ:
    seed = seeds.split(",")[int(os.environ["RANK"])]
    if os.environ.get("PYTHONHASHSEED") != seed:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": seed})

import torch  # noqa: E402

import rewriter  # noqa: E402
from rewriter import tiny  # noqa: E402

mode, cache_dir, out = sys.argv[1:4]
source = rewriter.compile("gemma4", cache_dir=cache_dir, use_shipped=False).source if mode == "patched" else None
distributed = "WORLD_SIZE" in os.environ
model = tiny.causal_lm(2).train()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if distributed:
    torch.distributed.init_process_group("gloo")
    # On 5.5.0, once fixed, the KV-shared layers keep k/v projections that nothing uses (5.5.2 drops them).
    model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ids = tiny.input_ids(batch=2, length=16)
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
rank = torch.distributed.get_rank() if distributed else 0
result = {"rank": rank, "losses": losses, "source": source, "hash_seed": os.environ.get("PYTHONHASHSEED")}
(Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
if distributed:
    del model, optimizer, loss  # the DDP reducer first, then the process group (see examples/sft_text_only.py)
    torch.distributed.destroy_process_group()
