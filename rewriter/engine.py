"""Apply a family's rules to source text, one LibCST parse per file, and validate what comes out."""

from __future__ import annotations

import ast

import libcst as cst

from rewriter.families import Family
from rewriter.report import RewriterError, RuleOutcome


class InvalidOutputError(RewriterError):
    """A rule wrote source that does not parse or compile: a bug in the rule, never written to the cache."""


def rewrite(family: Family, sources: dict[str, str]) -> tuple[dict[str, str], tuple[RuleOutcome, ...]]:
    """Patched text of every target file, and one outcome per rule in registry order."""
    modules = {target: cst.parse_module(sources[target]) for target in family.targets}
    outcomes = []
    for rule in family.rules():
        modules[rule.target], outcome = rule().apply(modules[rule.target])
        outcomes.append(outcome)
    return {target: module.code for target, module in modules.items()}, tuple(outcomes)


def validate(text: str, filename: str) -> ast.Module:
    """Parse and compile ``text`` as ``filename``, returning its AST; ``InvalidOutputError`` if it is not valid."""
    try:
        tree = ast.parse(text, filename)
        compile(tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as error:
        raise InvalidOutputError(f"rewritten {filename} is not valid Python: {error}") from error
    return tree
