"""rotary-compute-order: every process traces the same forward, so a warm start finds what inductor cached.

Gemma-4's text model computes its position embeddings in the order of ``set(config.layer_types)``, which the string
hash seed decides, different in every process. Shown with real processes, real ``PYTHONHASHSEED`` values, real
inductor and its real on-disk cache, shared by two processes whose seeds order the set differently.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import hash_seeds_by_order, run_python

COMPILE = """
import json, sys
import torch
from torch._dynamo.utils import counters
import rewriter
from rewriter import testing

if sys.argv[1] == "patched":
    rewriter.compile("gemma4", cache_dir=sys.argv[2], strict=True)
config = testing.text_config(0, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
model = testing.causal_lm(0, config=config)
order = []
hook = model.model.rotary_emb.register_forward_pre_hook(lambda module, args: order.append(args[2]))
ids = testing.input_ids()
with torch.no_grad():
    model(ids, use_cache=False)
    hook.remove()
    torch.compile(model, fullgraph=True)(ids, use_cache=False)
print(json.dumps({"order": order, **counters["inductor"]}))
"""


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_a_process_with_another_hash_seed_hits_the_inductor_cache(patched, tmp_path):
    first, other = (seeds[0] for seeds in hash_seeds_by_order(8).values())
    runs = []
    for seed in (first, other):  # one inductor cache: the second process starts warm
        env = {"PYTHONHASHSEED": str(seed), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
        result = run_python(COMPILE, "patched" if patched else "unpatched", str(tmp_path / "cache"), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.splitlines()[-1]))
    assert runs[0]["fxgraph_cache_miss"] >= 1
    if patched:
        assert [run["order"] for run in runs] == [["full_attention", "sliding_attention"]] * 2
        assert runs[1]["fxgraph_cache_hit"] >= 1 and "fxgraph_cache_miss" not in runs[1]
    else:  # the other seed computes the embeddings the other way round: another graph, compiled again
        assert runs[0]["order"] == runs[1]["order"][::-1]
        assert runs[1]["fxgraph_cache_miss"] >= 1 and "fxgraph_cache_hit" not in runs[1]
