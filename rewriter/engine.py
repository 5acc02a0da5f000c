"""Apply a family's rules to source text, parsing with LibCST only the definitions they read, and validate what
comes out."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import libcst as cst
import libcst.matchers as m

from rewriter.families import FAMILIES, Family
from rewriter.report import RewriterError, RuleOutcome


class InvalidOutputError(RewriterError):
    """A rule wrote source that does not parse or compile: a bug in the rule, never written to the cache."""


def rewrite(family: Family, sources: dict[str, str]) -> tuple[dict[str, str], tuple[RuleOutcome, ...]]:
    """Patched text of every file the family patches, and one outcome per bound rule, in the family's order."""
    bound = family.rules()
    scopes = {target: [rule.scope for file, rule in bound if file == target] for target in family.targets}
    parts = {target: split(sources[target], scopes[target]) for target in family.targets}
    outcomes = []
    for target, rule_class in bound:
        rule = rule_class()
        fixed = [rule.fix(part) if isinstance(part, cst.Module) else part for part in parts[target]]
        outcomes.append(rule.outcome(target))
        if outcomes[-1].status == "applied":
            parts[target] = fixed
    return {target: "".join(_text(part) for part in parts[target]) for target in family.targets}, tuple(outcomes)


def split(text: str, scopes: list[m.BaseMatcherNode]) -> list[str | cst.Module]:
    """``text`` in parts that join back into it: each top-level definition that one of ``scopes`` matches, judged
    by its kind and name, parsed by LibCST as a module of its own with the comments and blank lines above it, and
    the text between them as it is."""
    lines = io.StringIO(text, newline="").readlines()
    config = _config(text)
    parts: list[str | cst.Module] = []
    done = end = 0  # the lines already in parts; the lines up to the end of the last statement
    for statement in ast.parse(text).body:
        stub = _stub(statement)
        if stub is not None and any(m.matches(stub, scope) for scope in scopes):
            parts += ["".join(lines[done:end]), _parse_definition("".join(lines[end : statement.end_lineno]), config)]
            done = statement.end_lineno
        end = statement.end_lineno
    return [*parts, "".join(lines[done:])]


def _stub(statement: ast.stmt) -> cst.CSTNode | None:
    """An empty ``ClassDef`` or ``FunctionDef`` named as ``statement``; ``None`` for other statements."""
    body = cst.SimpleStatementSuite([cst.Pass()])
    if isinstance(statement, ast.ClassDef):
        return cst.ClassDef(cst.Name(statement.name), body)
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return cst.FunctionDef(cst.Name(statement.name), cst.Parameters(), body)
    return None


def _config(text: str) -> dict[str, str]:
    """The indent and newline LibCST infers for the whole of ``text`` (its first ones), for the parts parsed alone."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    indent = next((token.string for token in tokens if token.type == tokenize.INDENT), "    ")
    newline = re.search(r"\r\n?|\n", text)
    return {"default_indent": indent, "default_newline": newline.group() if newline else "\n"}


def _parse_definition(code: str, config: dict[str, str]) -> cst.Module:
    """``code``, one definition below comments and blank lines, as a module in which the definition owns those lines,
    as it does in a whole file (but for the lines LibCST gives to the header of a file, or to a block above)."""
    module = cst.parse_module(code)
    (definition,) = module.body
    definition = definition.with_changes(leading_lines=[*module.header, *definition.leading_lines])
    return module.with_changes(header=(), body=[definition], **config)


def _text(part: str | cst.Module) -> str:
    return part if isinstance(part, str) else part.code


def scan(package: Path) -> list[RuleOutcome]:
    """Every rule of every family on every modeling file (and ``cache_utils.py``) of a transformers folder: the
    ``applied`` outcomes, which name each file where a known buggy shape appears, patched by rewriter or not."""
    rules = dict.fromkeys(rule for family in FAMILIES.values() for _, rule in family.rules())
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
