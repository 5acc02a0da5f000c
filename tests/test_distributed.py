"""Fine-tuning KV-shared models (Gemma-4 and Gemma-3n E2B/E4B) on several processes: real torch.distributed, gloo,
two ranks under torchrun, running ``tests/distributed_train.py``.

- DDP through ``Trainer`` with gradient checkpointing: Trainer sets ``find_unused_parameters=False``, which DDP
  honours only when every parameter gets a gradient. Patched shared layers build no K/V weights (as upstream's fix);
  a model built before ``rewriter.compile`` keeps them unused, the shape of the earlier fix, and crashes.
- FSDP2 with mixed precision casts each sharded layer's inputs and rebuilds every plain dict among them: the shared
  K/V stored in a plain dict never reach the shared layers. Shown on 5.8.1, which ships that dict; patched (a
  ``KVSharingDict``, a ``UserDict`` as 5.9.0's) it trains, on 5.8.1 and on the test environment's 5.5.0 alike.

Each rank trains on the same rows as the one-process run, so the losses must equal it.
"""

from __future__ import annotations

import pytest

from tests.conftest import torchrun_train as train

FAMILIES = ("gemma4", "gemma3n")
UNUSED_PARAMETERS = "Expected to have finished reduction in the prior iteration"


def losses(results: list[dict]) -> list[list[float]]:
    for result in results:
        assert "error" not in result, result.get("traceback")
    return [result["losses"] for result in results]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_ddp_with_gradient_checkpointing_needs_no_unused_parameter_search(family, tmp_path):
    alone = losses(train(tmp_path, family, "patched", "trainer", ranks=1))[0]
    # two ranks' means of two rows each, averaged, against one mean of four: equal up to float32 summation order
    assert losses(train(tmp_path, family, "patched", "trainer")) == [pytest.approx(alone, rel=1e-6)] * 2
    # Built before compile, shared layers keep K/V weights that nothing uses: DDP stops at the second step.
    late = train(tmp_path, family, "patched-late", "trainer")
    assert all(UNUSED_PARAMETERS in result.get("error", "") for result in late)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_mixed_precision_trains_patched_like_one_process(family, tmp_path):
    alone = losses(train(tmp_path, family, "patched", "fsdp2", ranks=1))[0]
    assert losses(train(tmp_path, family, "patched", "fsdp2")) == [alone, alone]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp2_mixed_precision_loses_a_plain_dict_of_shared_kv_and_patched_trains(family, tmp_path, release_env):
    # 5.8.1: the last release carrying the shared K/V in a plain dict (Gemma-4 from 5.5.2, Gemma-3n from 5.6.0)
    python_5_8_1 = release_env("5.8.1")
    stock = train(tmp_path, family, "unpatched", "fsdp2", python=python_5_8_1)
    assert all(result.get("error", "").startswith("KeyError") for result in stock)
    alone = losses(train(tmp_path, family, "patched", "fsdp2", ranks=1, python=python_5_8_1))[0]
    assert losses(train(tmp_path, family, "patched", "fsdp2", python=python_5_8_1)) == [alone, alone]
