"""kv-sharing-fsdp2 under accelerate: a model whose decoder layers accelerate hooks (a ``device_map`` over several
devices, or offloading; here one layer offloaded to disk, which a CPU can do) hands each layer a copy of every
mapping it is passed, so a plain dict carrying the shared K/V loses them (``KeyError``).

Gemma-4 5.5.2 passes its dict positionally, outside ``_skip_keys_device_placement``, and crashes so (5.5.3 passes it
by keyword and skips it). rewriter's own dict (``kv-sharing-without-cache``, Gemma-4 5.5.0-5.5.1, Gemma-3n up to
5.5.4) did too until the carrier became 5.23.0's ``KVSharingDict``, which accelerate moves in place. The oracle is
the same weights' undispatched model. ``tests/release_check_device_map.py`` measures both; the 5.5.2 environment
runs when REWRITER_E2E_RELEASES names it (or is "all").
"""

from __future__ import annotations

import pytest

import rewriter
from tests.conftest import release_check
from tests.release_check_device_map import check
from tests.test_releases import e2e_releases


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_patched_dispatched_model_gives_the_undispatched_logits(cache_dir, family):
    report = rewriter.compile(family, cache_dir=cache_dir, strict=True)
    assert report.outcome("kv-sharing-fsdp2").status == report.outcome("kv-sharing-without-cache").status == "applied"
    assert check(family) == {"use_cache=True": 0.0, "use_cache=False": 0.0, "generate_equal": True}


@pytest.mark.parametrize("version", [version for version in e2e_releases("gemma4", default="") if version == "5.5.2"])
def test_gemma4_5_5_2_crashes_dispatched_unpatched_and_runs_patched(version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check_device_map.py", tmp_path / "cache", "gemma4", cwd=tmp_path)
    assert result["transformers"] == version and result["outcomes"]["gemma4"] == "applied"
    unpatched, patched = result["unpatched"]["gemma4"], result["patched"]["gemma4"]
    assert all(str(value).startswith("KeyError") for value in unpatched.values()), unpatched
    assert patched == {"use_cache=True": 0.0, "use_cache=False": 0.0, "generate_equal": True}
