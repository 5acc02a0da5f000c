"""A few DDP steps of the tiny KV-shared model with gradient checkpointing; each rank writes OUT/rank-N.json.

    python -m torch.distributed.run --nproc-per-node 4 tests/ddp_train.py CACHE_DIR OUT    # gloo on CPU
    python tests/ddp_train.py CACHE_DIR OUT                                               # one process, no DDP

Every rank calls ``rewriter.compile("gemma4")`` at start-up against the same (empty) cache folder, as a
``torchrun`` job does. Every rank trains on the same batch, so the losses must equal the single-process ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import rewriter
from rewriter import tiny

report = rewriter.compile("gemma4", cache_dir=sys.argv[1], use_shipped=False)
distributed = "WORLD_SIZE" in os.environ
model = tiny.causal_lm(2).train()
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if distributed:
    torch.distributed.init_process_group("gloo")
    # DDP's start-up broadcast was seen to hand some ranks other rotary inv_freq buffers (unpatched too, with
    # gloo on CPU); they are computed from the config on every rank, so they stay out of the broadcast.
    rotary = [name for name, _ in model.named_buffers() if "rotary_emb" in name]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, rotary)
    # On 5.5.0 the KV-shared layers keep k/v projections that nothing uses any more (5.5.2 drops them).
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
result = {"rank": rank, "losses": losses, "source": report.source}
(Path(sys.argv[2]) / f"rank-{rank}.json").write_text(json.dumps(result))
if distributed:
    torch.distributed.destroy_process_group()
