"""rotary-buffer-order: every process registers the rotary buffers in one order, so DDP's broadcast keeps them.

Processes of one job start with different string hash seeds; ``set(config.layer_types)`` then iterates in an
order that differs between them. Shown with real processes, real ``PYTHONHASHSEED`` values and real DDP (gloo).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import hash_seeds_by_order, run_python, torchrun_train

FAMILIES = ("gemma3", "gemma3n", "gemma4")
ORDERS = """
import json, sys
import rewriter
from rewriter import testing

def orders():
    return {f: [n for n, _ in testing.text_model(f).named_buffers() if "inv_freq" in n] for f in %r}

before = orders()
rewriter.compile_on_import(cache_dir=sys.argv[1])
print(json.dumps({"before": before, "after": orders()}))
""" % (FAMILIES,)


def test_buffer_order_is_the_same_in_every_process_once_compiled(tmp_path):
    runs = []
    for seed in range(6):
        result = run_python(ORDERS, str(tmp_path / "cache"), env={"PYTHONHASHSEED": str(seed)})
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.splitlines()[-1]))
    for family in FAMILIES:
        before = {tuple(run["before"][family]) for run in runs}
        after = {tuple(run["after"][family]) for run in runs}
        assert len(before) == 2, family  # unpatched: the hash seed decides
        (order,) = after
        assert [name.split(".")[-1] for name in order] == [  # upstream's fixed order: sorted layer types
            "full_attention_inv_freq",
            "full_attention_original_inv_freq",
            "sliding_attention_inv_freq",
            "sliding_attention_original_inv_freq",
        ]


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_torchrun_ranks_with_different_hash_seeds_train_like_one_process(patched, tmp_path):
    """Plain DDP, every buffer broadcast: ranks whose set order differs from rank 0's get swapped frequencies."""
    groups = list(hash_seeds_by_order(16).values())
    assert len(groups) == 2
    seeds = [groups[0][0], groups[1][0], groups[0][1], groups[1][1]]  # ranks 1 and 3 differ from rank 0
    mode = "patched" if patched else "unpatched"
    env = {"REWRITER_RANK_HASH_SEEDS": ",".join(map(str, seeds))}
    results = torchrun_train(tmp_path, "gemma4", mode, "ddp", ranks=4, env=env)
    reference = torchrun_train(tmp_path, "gemma4", mode, "ddp", ranks=1)[0]["losses"]
    assert [rank["hash_seed"] for rank in results] == [str(seed) for seed in seeds]
    if patched:
        for rank in results:
            assert rank["losses"] == pytest.approx(reference, rel=1e-6, abs=0)
        assert len(list((tmp_path / "cache").glob("*.json"))) == 1  # one entry, built once for the four ranks
    else:  # the ranks whose order differs from rank 0's compute with swapped frequencies from the first step on
        assert results[0]["losses"][0] == pytest.approx(reference[0], rel=1e-6, abs=0)
        assert all(results[rank]["losses"][0] != pytest.approx(reference[0], rel=1e-4) for rank in (1, 3))
