"""Every supported transformers release, told apart: the rule matrix over real sources, and end-to-end installs.

The matrix reads each release's wheel (downloaded once, kept in $REWRITER_WHEEL_DIR) without importing it, and
checks the release's shipped entry against it (test_cache shows the shipped entries are what the rules build). The
end-to-end checks install a release into its own virtual environment, reusing this environment's torch: by
default the latest Gemma-4 release and Gemma-3n on 4.57.6 (the test environment itself is 5.5.0); set
REWRITER_E2E_RELEASES to a comma-separated list (for example "4.53.0,4.57.6,5.5.2,5.5.4,5.24.0": each family runs
those that are among its releases) or to "all" for more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from rewriter.build import entry_key
from rewriter.cache import shipped_cache
from rewriter.engine import rewrite
from rewriter.families import FAMILIES, Family
from rewriter.releases import fetch_wheel, wheel_sources
from tests.conftest import release_check, release_tree, run_python

APPLIED, NOT_NEEDED = "applied", "not_needed"


def release(version: str) -> tuple[int, ...]:
    return tuple(map(int, version.split(".")))


def rotary_buffer_order(version: str) -> tuple[str, int]:
    """Buffers per layer type in set order from 5.0 (4.x: one rotary embedding per layer type); sorted from 5.16."""
    return (APPLIED, 1) if (5, 0) <= release(version) < (5, 16) else (NOT_NEEDED, 0)


def rotary_compute_order(version: str) -> tuple[str, int]:
    """Gemma-3 and 3n compute position embeddings per layer type in set order from 5.6 (4.x call one rotary embedding
    per layer type, 5.0 to 5.5 iterate ``config.layer_types``). Not fixed upstream as of 5.24.0."""
    return (APPLIED, 1) if release(version) >= (5, 6) else (NOT_NEEDED, 0)


def text_only_training(version: str) -> tuple[str, int]:
    """The mask builder's check that token types are given in training: 5.0 to 5.5.4 (Gemma-4 from 5.5.0)."""
    return (APPLIED, 1) if (5, 0) <= release(version) < (5, 6) else (NOT_NEEDED, 0)


def accumulation_double_division(version: str) -> tuple[str, int]:
    """Trainer divides twice from 5.2.0 until 5.5.4."""
    return (APPLIED, 1) if (5, 2) <= release(version) < (5, 5, 4) else (NOT_NEEDED, 0)


def kv_sharing_fsdp2(version: str) -> tuple[str, int]:
    """A plain dict carries the shared K/V until 5.8.1: upstream's from 5.5.2 (Gemma-4) and 5.6.0 (Gemma-3n), before
    them the one kv-sharing-without-cache inserts. 5.9.0 has a ``UserDict``, 5.23.0 ``KVSharingDict`` (a UserDict)."""
    return (APPLIED, 1) if release(version) < (5, 9) else (NOT_NEEDED, 0)


def text_only_output_properties(version: str, sites: int) -> tuple[str, int]:
    """``image_hidden_states`` (Gemma-3n and Gemma-4: ``audio_hidden_states`` too) of two output classes are
    properties from 5.24.0, fields before; open upstream."""
    return (APPLIED, sites) if release(version) >= (5, 24) else (NOT_NEEDED, 0)


def flash_attention_image_mask(version: str) -> tuple[str, int]:
    """The forward's guard in every release; from 5.24.0 also both classes' ``__init__``, which refuse FlashAttention."""
    return APPLIED, 3 if release(version) >= (5, 24) else 1


def kv_shared_slice(version: str) -> tuple[str, int]:
    """Two trimming sites up to 5.9.0, one from 5.10.1 (StaticCache's is guarded by ``> 0``), fixed in 5.14.0."""
    if release(version) >= (5, 14):
        return NOT_NEEDED, 0
    return APPLIED, 2 if release(version) < (5, 10) else 1


def image_bidirectional_mask(version: str) -> tuple[str, int]:
    """``create_causal_mask_mapping`` ORs the image overlay after the window (5.5.0-5.8.1); 5.9.0-5.12.1 build the
    masks generically at two sites, the overlay on every layer; 5.13.0 adds ``create_masks_for_vision_model``."""
    if release(version) >= (5, 13):
        return NOT_NEEDED, 0
    return APPLIED, 1 if release(version) < (5, 9) else 2


def gemma4(version: str) -> dict[str, tuple[str, int]]:
    before_5_13 = release(version) < (5, 13)
    return {
        "kv-shared-slice": kv_shared_slice(version),
        # use_gqa_in_sdpa and its call ask for GQA at any head dim; 5.13.0 stops at 256 (PR #46960)
        "sdpa-gqa-head-dim": (APPLIED, 2) if before_5_13 else (NOT_NEEDED, 0),
        # 5.5.2 stopped giving shared layers their own K/V when there is no cache
        "kv-sharing-without-cache": (APPLIED, 3) if release(version) < (5, 5, 2) else (NOT_NEEDED, 0),
        "kv-sharing-fsdp2": kv_sharing_fsdp2(version),
        # input_proj is bare in every release; 5.13 and later no longer cast the input to the weight's dtype themselves
        "input-proj-dequant": (APPLIED, 2 if release(version) < (5, 13) else 1),
        "rotary-buffer-order": rotary_buffer_order(version),
        "rotary-compute-order": (APPLIED, 1),  # in set order in every release, kept on the model
        "text-only-training": text_only_training(version),
        "loss-accumulation": (APPLIED, 2) if release(version) < (5, 6) else (NOT_NEEDED, 0),
        "fp16-vision-pooler": (APPLIED, 2) if release(version) < (5, 10) else (NOT_NEEDED, 0),
        "per-layer-inputs-from-embeds": (APPLIED, 1),  # open upstream
        "text-only-output-properties": text_only_output_properties(version, sites=4),
        # the audio tower refuses sdpa from 5.20.0; before, it supports it (and forcing eager would invert its mask)
        "audio-sdpa-fallback": (APPLIED, 1) if release(version) >= (5, 20) else (NOT_NEEDED, 0),
        # the audio tower reads eager's float mask as boolean until 5.20.0
        "audio-eager-mask": (APPLIED, 1) if release(version) < (5, 20) else (NOT_NEEDED, 0),
        # the audio features are scattered without a cast until 5.15.0 (PR #47482)
        "audio-features-dtype": (APPLIED, 1) if release(version) < (5, 15) else (NOT_NEEDED, 0),
        # finfo of packed weights (two clamps) and the cast before `post`, until 5.11.0
        "audio-quantized-weights": (APPLIED, 3) if release(version) < (5, 11) else (NOT_NEEDED, 0),
        "router-softmax-float32": (APPLIED, 1) if before_5_13 else (NOT_NEEDED, 0),  # float32 from 5.13.0
        "image-bidirectional-mask": image_bidirectional_mask(version),
        # _maybe_slice_kv_shared_inputs slices per-layer inputs that may be None: 5.23.0, 5.24.0 (5.25.0 guards it)
        "per-layer-inputs-none": (APPLIED, 1) if (5, 23) <= release(version) < (5, 25) else (NOT_NEEDED, 0),
        "video-features-tuple": (APPLIED, 1) if version == "5.15.0" else (NOT_NEEDED, 0),  # torch.split's tuple
    }


# The release tables of docs/releases.md: which rule each release needs, and at how many sites.
MATRIX = {
    "gemma2": {
        # 5.21.0 declares _supports_sdpa = False
        version: {"softcap-sdpa": (APPLIED, 1) if release(version) < (5, 21) else (NOT_NEEDED, 0)}
        for version in FAMILIES["gemma2"].releases
    },
    "gemma3": {
        version: {
            "rotary-buffer-order": rotary_buffer_order(version),
            "rotary-compute-order": rotary_compute_order(version),
            "text-only-training": text_only_training(version),
            # 4.57.0 declares accepts_loss_kwargs = False (its own mean loss); 5.17.0 calls self.loss_function instead
            "loss-accumulation": (APPLIED, 1) if release(version) < (4, 57) else (NOT_NEEDED, 0),
            "text-only-output-properties": text_only_output_properties(version, sites=2),
            "flash-attention-image-mask": flash_attention_image_mask(version),
            "processor-double-bos": (APPLIED, 1),  # open upstream
        }
        for version in FAMILIES["gemma3"].releases
    },
    "gemma3n": {
        version: {
            "rotary-buffer-order": rotary_buffer_order(version),
            "rotary-compute-order": rotary_compute_order(version),
            # 4.53.0-4.55.4 slice the cache, 4.56.0-5.5.4 keep `shared_layers` on it; 5.6.0 has `shared_kv_states`.
            "kv-sharing-without-cache": (APPLIED, 3) if release(version) < (5, 6) else (NOT_NEEDED, 0),
            "kv-sharing-fsdp2": kv_sharing_fsdp2(version),
            "per-layer-inputs-from-embeds": (APPLIED, 1),  # open upstream
            "loss-accumulation": (APPLIED, 2) if release(version) < (5, 6) else (NOT_NEEDED, 0),  # as Gemma-4
            "text-only-output-properties": text_only_output_properties(version, sites=4),
            "placeholder-mask-defaults": (APPLIED, 1) if version == "4.55.0" else (NOT_NEEDED, 0),
            # 5.0.0 reuses `audio_features` for the tower's output; 5.3.0 renames it
            "audio-outputs-collision": (APPLIED, 1) if (5, 0) <= release(version) < (5, 3) else (NOT_NEEDED, 0),
            "processor-double-bos": (APPLIED, 1),  # open upstream
        }
        for version in FAMILIES["gemma3n"].releases
    },
    "gemma4": {version: gemma4(version) for version in FAMILIES["gemma4"].releases},
    "trainer": {
        version: {"accumulation-double-division": accumulation_double_division(version)}
        for version in FAMILIES["trainer"].releases
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_release_has_a_shipped_entry_with_the_verdicts_of_the_bugs_tables(family):
    """Every supported release's real sources (each wheel fetched once per machine) hit a shipped entry that checks
    against them, whose outcomes are those tables'. test_cache shows the shipped entries are what the rules build."""
    for version in FAMILIES[family].releases:
        sources = wheel_sources(fetch_wheel(version), FAMILIES[family].targets)
        entry = shipped_cache().load(entry_key(FAMILIES[family], sources)[0], sources)
        assert entry is not None, f"transformers {version} has no shipped {family} entry"
        assert {outcome.rule: (outcome.status, outcome.sites) for outcome in entry.outcomes} == MATRIX[family][version]


@pytest.mark.parametrize("family", [name for name, family in FAMILIES.items() if family.opt_in])
def test_the_opt_in_fused_loss_routes_every_lm_head_of_every_release(family):
    """No entry ships the opt-in fused loss: its rule runs here on each release's shipped entry, as it runs after the
    family's fixes, and routes each LM-head model of the file (Gemma-2 has no multimodal one)."""
    ((modeling, rules),) = FAMILIES[family].opt_in["fused-loss"].items()
    alone = Family(family, FAMILIES[family].supported, {modeling: rules})
    models = 1 if family == "gemma2" else 2
    verdicts, by_text = {}, {}  # releases share texts: each is rewritten once
    for version in FAMILIES[family].releases:
        sources = wheel_sources(fetch_wheel(version), FAMILIES[family].targets)
        text = shipped_cache().load(entry_key(FAMILIES[family], sources)[0], sources).texts[modeling]
        if text not in by_text:
            (outcome,) = rewrite(alone, {modeling: text})[1]
            by_text[text] = (outcome.status, outcome.sites)
        verdicts[version] = by_text[text]
    assert verdicts == {version: (APPLIED, models) for version in FAMILIES[family].releases}


def test_report_reads_a_source_tree_without_importing_it(tmp_path):
    package = release_tree("5.13.1", "gemma4", tmp_path)
    result = run_python("", "-m", "rewriter", "report", "gemma4", "--source-dir", str(package), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = {outcome["rule"]: (outcome["status"], outcome["sites"]) for outcome in json.loads(result.stdout)}
    assert outcomes == MATRIX["gemma4"]["5.13.1"]


def test_scan_names_every_file_with_a_known_buggy_shape(tmp_path):
    """Families rewriter does not patch included: the rotary order bug is in six modeling files of 5.5.0."""
    with zipfile.ZipFile(fetch_wheel("5.5.0")) as wheel:
        wheel.extractall(tmp_path, [name for name in wheel.namelist() if name.endswith(".py")])
    result = run_python("", "-m", "rewriter", "scan", "--source-dir", str(tmp_path / "transformers"), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    found = {(finding["rule"], finding["file"]) for finding in json.loads(result.stdout)}
    assert {file for rule, file in found if rule == "rotary-buffer-order"} == {
        f"models/{model}/modeling_{model}.py"
        for model in ("gemma3", "gemma3n", "gemma4", "modernbert", "modernbert_decoder", "t5gemma2")
    }
    assert {(rule, file) for rule, file in found if rule != "rotary-buffer-order"} == {
        ("kv-shared-slice", "cache_utils.py"),
        ("kv-sharing-without-cache", "models/gemma4/modeling_gemma4.py"),
        ("kv-sharing-without-cache", "models/gemma3n/modeling_gemma3n.py"),
        ("input-proj-dequant", "models/gemma4/modeling_gemma4.py"),
        ("rotary-compute-order", "models/gemma4/modeling_gemma4.py"),  # Gemma-3 and 3n iterate a set from 5.6
        ("loss-accumulation", "models/gemma4/modeling_gemma4.py"),
        ("fp16-vision-pooler", "models/gemma4/modeling_gemma4.py"),
        ("per-layer-inputs-from-embeds", "models/gemma4/modeling_gemma4.py"),
        ("per-layer-inputs-from-embeds", "models/gemma3n/modeling_gemma3n.py"),
        ("flash-attention-image-mask", "models/gemma3/modeling_gemma3.py"),
        ("loss-accumulation", "models/gemma3n/modeling_gemma3n.py"),
        ("audio-eager-mask", "models/gemma4/modeling_gemma4.py"),
        ("audio-features-dtype", "models/gemma4/modeling_gemma4.py"),
        ("audio-quantized-weights", "models/gemma4/modeling_gemma4.py"),
        ("router-softmax-float32", "models/gemma4/modeling_gemma4.py"),
        ("image-bidirectional-mask", "models/gemma4/modeling_gemma4.py"),
        ("softcap-sdpa", "models/gemma2/modeling_gemma2.py"),
        # the training check on token types, in two families rewriter does not patch as well
        *(("text-only-training", f"models/{model}/modeling_{model}.py") for model in ("gemma3", "gemma4", "git", "paligemma")),
    }


def test_a_release_without_gemma4_sources_is_a_clear_error(tmp_path):
    package = tmp_path / "transformers"
    with zipfile.ZipFile(fetch_wheel("5.4.0")) as wheel:
        wheel.extract("transformers/cache_utils.py", tmp_path)
    result = run_python("", "-m", "rewriter", "report", "gemma4", "--source-dir", str(package))
    assert result.returncode == 2
    assert f"the transformers folder {package} has no integrations/sdpa_attention.py, models/gemma4/modeling_gemma4.py" in " ".join(
        result.stdout.split()
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_an_installed_transformers_older_than_gemma4_is_a_clear_error(tmp_path):
    target = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    subprocess.run([*command, str(fetch_wheel("5.4.0"))], check=True)
    result = run_python("", "-m", "rewriter", "compile", "gemma4", env={"PYTHONPATH": str(target)})
    assert result.returncode == 2
    assert "transformers 5.4.0 is installed; gemma4 supports transformers>=5.5,<6" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stdout + result.stderr


def e2e_releases(family: str, default: str) -> list[str]:
    """The family's releases that REWRITER_E2E_RELEASES names ("all": every one), else ``default``."""
    releases = FAMILIES[family].releases
    chosen = os.environ.get("REWRITER_E2E_RELEASES", default)
    return list(releases) if chosen == "all" else [version for version in chosen.split(",") if version in releases]


@pytest.mark.parametrize("version", e2e_releases("gemma4", default=FAMILIES["gemma4"].releases[-1]))
def test_end_to_end_on_an_installed_release(version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check.py", tmp_path / "cache", cwd=tmp_path)
    assert result["transformers"] == version
    assert result["origin"] == "shipped"
    outcomes = {**gemma4(version), "accumulation-double-division": accumulation_double_division(version)}
    assert {rule: tuple(status) for rule, status in result["outcomes"].items()} == outcomes
    assert result["static_generate_equals_dynamic"]
    assert result["use_cache_gap"] == 0.0
    assert result["packed_input_proj_gap"] == 0.0
    assert result["text_only_training_gap"] == 0.0
    assert result["accumulation_loss_gap"] < 1e-5 and result["accumulation_weight_gap"] < 1e-6
    assert result["float16_vision_features_finite"]
    assert all(result["unchanged_where_not_needed"].values()), result["unchanged_where_not_needed"]
    for family, names in result["rotary_buffer_orders"].items():
        assert names == sorted(names, key=lambda name: name.split("_attention")[0]), family  # full before sliding
    needed_nothing = {rule for rule, (status, _) in outcomes.items() if status == NOT_NEEDED}
    parts = {
        "kv-shared-slice": {"cache_utils.py"},
        "kv-sharing-without-cache": {"Gemma4TextAttention"},
        "kv-sharing-fsdp2": {"Gemma4TextModel.forward"},
        "text-only-training": {"create_causal_mask_mapping", "Gemma4Model"},
        "loss-accumulation": {"Gemma4ForConditionalGeneration"},
        "fp16-vision-pooler": {"Gemma4VisionPooler", "Gemma4VisionModel"},
        "accumulation-double-division": {"trainer.py"},
    }
    expected_parts = set().union(*(parts[rule] for rule in needed_nothing if rule in parts))
    assert set(result["unchanged_where_not_needed"]) == expected_parts


# By default one 4.x release, whose train-mode forwards build no cache: every one of them shows the bug.
@pytest.mark.parametrize("version", e2e_releases("gemma3n", default="4.57.6"))
def test_gemma3n_kv_sharing_end_to_end_on_an_installed_release(version, tmp_path, release_env):
    result = release_check(release_env(version), "release_check_gemma3n.py", tmp_path / "cache", cwd=tmp_path)
    assert result["transformers"] == version
    assert result["origin"] == "shipped"
    assert {rule: tuple(status) for rule, status in result["outcomes"].items()} == MATRIX["gemma3n"][version]
    # Unpatched: no cache, wrong logits; 4.x builds no cache in training either. Cached logits are the oracle's up
    # to the last float bits on 4.x (1.6e-6 measured), exactly on 5.x.
    unpatched, patched = result["unpatched"], result["patched"]
    needed = result["outcomes"]["kv-sharing-without-cache"][0] == APPLIED
    assert (unpatched["uncached"] > 0.1) == needed
    assert (unpatched["train"] > 0.1) == (needed and release(version) < (5, 0))
    assert result["uncached_equals_cached"] and result["train_equals_cached"]
    assert result["state_dict_keys_are_the_oracles"]
    # 4.53.0 to 4.56.2 read the ignore list from the model's class, which a patch of methods cannot reach
    shared = [f"model.layers.{i}.self_attn.{name}.weight" for i in (4, 5) for name in ("k_norm", "k_proj", "v_proj")]
    assert result["unexpected_keys_on_load"] == (sorted(shared) if needed and release(version) < (4, 57) else [])
    assert max(patched.values()) < 1e-5
    assert all(result["generate_equals_oracle"].values()), result["generate_equals_oracle"]
    assert result["checkpointed_loss_gap"] < 1e-6
    assert result["grads_of_oracle_parameters"] and result["grad_gap"] < 1e-4
    assert all(result["unchanged_where_not_needed"].values())
    assert bool(result["unchanged_where_not_needed"]) == (not needed)
