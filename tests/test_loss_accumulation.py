"""loss-accumulation on Gemma-3 and Gemma-3n, end to end on installed releases.

One ``Trainer`` SGD step over the same four rows on the same weights, as batch 4 x accumulation 1 and as batch 1 x
accumulation 4 (tests/release_check_loss_accumulation.py). Unpatched, where the bug is, the accumulated run logs the
loss times 4 and moves the weights 4 times as far; patched, both runs log the first fixed release's loss and leave
the same weights. By default Gemma-3n on 4.57.6 (the environment test_releases.py already makes) and Gemma-3 on
4.56.2, its last buggy release; REWRITER_E2E_RELEASES picks others ("all": every release of each family).
"""

from __future__ import annotations

import pytest

from tests.conftest import release_check
from tests.test_releases import APPLIED, MATRIX, accumulation_double_division, e2e_releases, release

# The loss the first fixed release logs, on the seeded weights that ``weights`` names: Gemma-3 on 4.57.0 (its own
# mean loss, which Trainer divides; 4.57.6, 5.6.0 and 5.17.0 log the same), Gemma-3n on 5.6.0 (self.loss_function).
# Both runs, batch 4 x 1 and 1 x 4, log it to 1e-6 there. Measured with torch 2.13.0 on the CPU.
ORACLE = {
    "gemma3": {"weights": "e4d70aa07e370f9a", "loss": 5.716064929962158},
    "gemma3n": {"weights": "83c109503b04050e", "loss": 5.5473713874816895},
}
CASES = [
    *(("gemma3n", version) for version in e2e_releases("gemma3n", default="4.57.6")),
    *(("gemma3", version) for version in e2e_releases("gemma3", default="4.56.2")),
]


@pytest.mark.parametrize("family, version", CASES)
def test_loss_accumulation_end_to_end_on_an_installed_release(family, version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check_loss_accumulation.py", tmp_path / "cache", family, cwd=tmp_path)
    assert result["transformers"] == version
    assert result["origin"] == "shipped"
    assert_accumulation_fixed(family, version, result)


def assert_accumulation_fixed(family: str, version: str, result: dict) -> None:
    assert tuple(result["outcome"]) == MATRIX[family][version]["loss-accumulation"]
    assert result["weights"] == ORACLE[family]["weights"]  # the oracle's weights
    unpatched, patched = result["unpatched"], result["patched"]
    needed = result["outcome"][0] == APPLIED
    # 5.2.0 to 5.5.3: Trainer divides the gradients once more (accumulation-double-division, patched by compile too)
    trainer_divides_twice = accumulation_double_division(version)[0] == APPLIED
    # Unpatched: the accumulated step logs 4 times the batch's loss and, unless Trainer's bug divides it back, takes
    # a 4 times larger step
    assert (unpatched["accumulated"] == pytest.approx(4 * unpatched["whole"], rel=1e-5)) == needed
    if not trainer_divides_twice:
        assert (unpatched["weight_gap"] > 1e-3) == needed
    assert unpatched["whole"] == pytest.approx(ORACLE[family]["loss"], abs=1e-5)  # one batch: no accumulation, no bug
    # Patched (and upstream's where neither bug is): both runs log the oracle's loss and take the same step
    for run in (patched,) if needed or trainer_divides_twice else (unpatched, patched):
        assert abs(run["whole"] - ORACLE[family]["loss"]) < 1e-5
        assert abs(run["accumulated"] - ORACLE[family]["loss"]) < 1e-5
        assert abs(run["accumulated_logged"] - run["whole_logged"]) < 1e-4  # 4.x logs 4 decimal places
        assert run["weight_gap"] < 1e-6
        # upstream's Gemma-3 from 5.17.0 takes the loss kwargs instead: Trainer's num_items_in_batch reaches its loss
        if needed or not (family == "gemma3" and release(version) >= (5, 17)):
            assert run["accepts_loss_kwargs"] == [False, False]
