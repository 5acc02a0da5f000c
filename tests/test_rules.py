"""Each rule on its own samples (buggy, fixed, drifted shapes) and on the real transformers files."""

from __future__ import annotations

import difflib
import os
from importlib.metadata import version
from pathlib import Path
from textwrap import dedent

import libcst as cst
import pytest

from rewriter.engine import rewrite
from rewriter.families import FAMILIES, installed_transformers
from rewriter.rules.kv_shared_slice import KVSharedSliceRule

GOLDEN = Path(__file__).with_name("golden")
# every rule, opt-in ones included
RULES = tuple(dict.fromkeys(rule for family in FAMILIES.values() for _, rule in family.with_every_feature().rules()))


def apply(rule, code: str):
    return rule().apply(cst.parse_module(dedent(code)), "sample.py")


EXAMPLES = [(rule, buggy, patched) for rule in RULES for buggy, patched in ((rule.BUGGY, rule.PATCHED), *rule.EXAMPLES)]


@pytest.mark.parametrize("rule, buggy, patched", EXAMPLES, ids=lambda value: getattr(value, "id", ""))
def test_buggy_shape_is_rewritten_and_the_rest_left_alone(rule, buggy, patched):
    module, outcome = apply(rule, buggy)
    assert outcome.status == "applied" and outcome.sites >= 1
    assert module.code == dedent(patched)
    assert rule.marker in buggy  # scan parses only files with the marker


@pytest.mark.parametrize("rule, buggy, patched", EXAMPLES, ids=lambda value: getattr(value, "id", ""))
def test_second_pass_over_patched_text_changes_nothing(rule, buggy, patched):
    once, _ = apply(rule, buggy)
    twice, outcome = rule().apply(once, "sample.py")
    assert outcome.status == "not_needed"
    assert twice.code == once.code


@pytest.mark.parametrize(
    "rule, code", [(rule, code) for rule in RULES for code in rule.FIXED], ids=lambda value: getattr(value, "id", "")
)
def test_fixed_shape_is_not_needed(rule, code):
    module, outcome = apply(rule, code)
    assert outcome.status == "not_needed"
    assert module.code == dedent(code)


@pytest.mark.parametrize(
    "rule, code", [(rule, code) for rule in RULES for code in rule.DRIFTED], ids=lambda value: getattr(value, "id", "")
)
def test_drifted_shape_is_reported_and_left_unchanged(rule, code):
    module, outcome = apply(rule, code)
    assert outcome.status == "drift"
    assert outcome.sites == 0
    assert rule.expected in outcome.detail and outcome.file == "sample.py"
    assert module.code == dedent(code)


def test_slice_in_the_else_branch_of_a_guard_is_still_buggy():
    code = """
        def cache_layer_types(config, layer_types):
            if config.num_kv_shared_layers > 0:
                pass
            else:
                layer_types = layer_types[: -config.num_kv_shared_layers]
    """
    module, outcome = apply(KVSharedSliceRule, code)
    assert outcome.status == "applied"
    assert "layer_types[: len(layer_types) - config.num_kv_shared_layers]" in module.code


def test_guard_joined_by_or_does_not_count():
    code = """
        def cache_layer_types(config, layer_types, force):
            if config.num_kv_shared_layers > 0 or force:
                layer_types = layer_types[: -config.num_kv_shared_layers]
    """
    assert apply(KVSharedSliceRule, code)[1].status == "applied"


def diff_of_installed_release(family, sources: dict[str, str] | None = None) -> str:
    """What ``family``'s rules change in the installed transformers, or from ``sources`` to what they make of it."""
    _, package = installed_transformers(family)
    original = {target: (package / target).read_text() for target in family.targets}
    patched, outcomes = rewrite(family, original)
    assert all(outcome.status != "drift" for outcome in outcomes)
    sources = sources or original
    return "".join(
        line
        for target in family.targets
        for line in difflib.unified_diff(
            sources[target].splitlines(True), patched[target].splitlines(True), f"a/{target}", f"b/{target}"
        )
    )


@pytest.mark.skipif(version("transformers") != "5.5.0", reason="the golden diffs are of transformers 5.5.0")
@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda family: family.name)
def test_golden_diff_of_transformers_5_5_0(family):
    """The exact change on the real files; regenerate with REWRITER_REGENERATE_GOLDEN=1 after a deliberate change."""
    golden = GOLDEN / f"{family.name}-5.5.0.diff"
    actual = diff_of_installed_release(family)
    if os.environ.get("REWRITER_REGENERATE_GOLDEN"):
        golden.write_text(actual)
    assert actual == golden.read_text()


@pytest.mark.skipif(version("transformers") != "5.5.0", reason="the golden diffs are of transformers 5.5.0")
@pytest.mark.parametrize("family", [family for family in FAMILIES.values() if family.opt_in], ids=lambda f: f.name)
def test_golden_diff_of_the_fused_loss_on_transformers_5_5_0(family):
    """What ``fused_loss=True`` adds to the family's fixes."""
    golden = GOLDEN / f"{family.name}-fused-loss-5.5.0.diff"
    _, package = installed_transformers(family)
    fixed, _ = rewrite(family, {target: (package / target).read_text() for target in family.targets})
    actual = diff_of_installed_release(family.with_features("fused-loss"), fixed)
    if os.environ.get("REWRITER_REGENERATE_GOLDEN"):
        golden.write_text(actual)
    assert actual == golden.read_text()
