"""Apply a family's rules to source text, one LibCST parse per file, and validate what comes out."""

from __future__ import annotations

import ast
from pathlib import Path

import libcst as cst

from rewriter.families import FAMILIES, Family
from rewriter.report import RewriterError, RuleOutcome


class InvalidOutputError(RewriterError):
    """A rule wrote source that does not parse or compile: a bug in the rule, never written to the cache."""


def rewrite(family: Family, sources: dict[str, str]) -> tuple[dict[str, str], tuple[RuleOutcome, ...]]:
    """Patched text of every file the family patches, and one outcome per bound rule, in the family's order."""
    modules = {target: cst.parse_module(sources[target]) for target in family.targets}
    outcomes = []
    for target, rule in family.rules():
        modules[target], outcome = rule().apply(modules[target], target)
        outcomes.append(outcome)
    return {target: module.code for target, module in modules.items()}, tuple(outcomes)


def scan(package: Path) -> list[RuleOutcome]:
    """Every rule of every family on every modeling file (and ``cache_utils.py``) of a transformers folder: the
    ``applied`` outcomes, which name each file where a known buggy shape appears, patched by rewriter or not."""
    rules = dict.fromkeys(rule for spec in FAMILIES.values() for _, rule in spec.rules())
    found = []
    for path in [package / "cache_utils.py", *sorted(package.glob("models/*/modeling_*.py"))]:
        text = path.read_text(encoding="utf-8")
        candidates = [rule for rule in rules if rule.marker in text]
        if not candidates:
            continue
        module, file = cst.parse_module(text), path.relative_to(package).as_posix()
        found += [outcome for rule in candidates if (outcome := rule().apply(module, file)[1]).status == "applied"]
    return found


def validate(text: str, filename: str) -> ast.Module:
    """Parse and compile ``text`` as ``filename``, returning its AST; ``InvalidOutputError`` if it is not valid."""
    try:
        tree = ast.parse(text, filename)
        compile(tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        raise InvalidOutputError(f"rewritten {filename} is not valid Python: {error}") from error
    return tree
