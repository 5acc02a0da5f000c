"""The interface every rule implements: a LibCST transformer that fixes one bug and says what it saw.

Imported only when source must be rewritten; a cache hit never loads LibCST.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Callable, ClassVar

import libcst as cst
import libcst.matchers as m

# The attributes where LibCST's matcher decorators leave their matchers on the methods they decorate: private
# names, the same in every LibCST that pyproject.toml allows (it caps LibCST at the releases tested).
from libcst.matchers._decorators import (
    CONSTRUCTED_LEAVE_MATCHER_ATTR,
    CONSTRUCTED_VISIT_MATCHER_ATTR,
    VISIT_NEGATIVE_MATCHER_ATTR,
    VISIT_POSITIVE_MATCHER_ATTR,
)

from rewriter.report import RuleOutcome


class Rule(cst.CSTTransformer):
    """One bug fix. A fresh instance visits one file once; which files a rule visits is the families' business
    (``rewriter.families``), so one rule serves every file that has its bug.

    Subclasses name the bug (``id``), text that every buggy file contains (``marker``: ``scan`` parses
    no other file), the top-level definitions they read (``scope``, a matcher of a definition's kind and name only:
    ``rewrite`` parses no other part of the file, which keeps a cold compile cheap) and the buggy shape they look for
    (``expected``, quoted in drift messages).
    While visiting they call ``rewrote()`` for each buggy place they fix, ``found_fixed()`` when they see the shape
    upstream already fixed, and ``drift(why)`` when a shape is only half recognised. ``check()`` runs after the visit.
    Their methods may use LibCST's ``m.visit``, ``m.leave``, ``m.call_if_inside`` and ``m.call_if_not_inside`` with
    node matchers (or ``|`` of them): they run as in ``m.MatcherDecoratableTransformer``, each matcher tried only on
    nodes of its type.

    Each rule carries samples that the tests turn into cases: ``BUGGY`` becomes ``PATCHED`` (and so does each
    further ``(buggy, patched)`` pair in ``EXAMPLES``, one per other buggy shape the rule knows); every ``FIXED``
    snippet is reported ``not_needed``; every ``DRIFTED`` snippet is reported ``drift`` and left unchanged.
    """

    id: ClassVar[str]
    marker: ClassVar[str]
    scope: ClassVar[m.BaseMatcherNode]
    expected: ClassVar[str]
    BUGGY: ClassVar[str]
    PATCHED: ClassVar[str]
    EXAMPLES: ClassVar[tuple[tuple[str, str], ...]] = ()
    FIXED: ClassVar[tuple[str, ...]]
    DRIFTED: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        super().__init__()
        self.sites = 0
        self.has_fixed_shape = False
        self.problems: list[str] = []
        self.parts: Counter[str] = Counter()  # the parts of a multi-part fix found so far, for ``check``
        self.inside: dict[m.BaseMatcherNode, cst.CSTNode] = {}  # the outermost node each context matcher matched

    def rewrote(self) -> None:
        self.sites += 1

    def found_fixed(self) -> None:
        self.has_fixed_shape = True

    def drift(self, why: str) -> None:
        self.problems.append(why)

    def check(self) -> None:
        """After the visit: record, with ``drift``, the parts of a multi-part fix that were not all found."""

    def apply(self, module: cst.Module, file: str = "") -> tuple[cst.Module, RuleOutcome]:
        """Rewrite ``module`` (the transformers ``file``); on anything but ``applied`` it comes back unchanged."""
        fixed = self.fix(module)
        outcome = self.outcome(file)
        return (fixed if outcome.status == "applied" else module), outcome

    def fix(self, module: cst.Module) -> cst.Module:
        """Visit the statements of ``module`` in scope, a whole file or one of the parts the engine parses of it;
        ``outcome`` tells, after the last part, whether the fixes stand."""
        self.module = module
        body: list[cst.BaseStatement] = []
        for statement in module.body:
            visited = statement.visit(self) if m.matches(statement, self.scope) else statement
            body.extend(visited.nodes if isinstance(visited, cst.FlattenSentinel) else [visited])
        return module.with_changes(body=body)

    def outcome(self, file: str) -> RuleOutcome:
        """What the visits found in ``file``, once ``check`` has run."""
        self.check()
        if self.problems:
            return RuleOutcome(self.id, "drift", 0, file, f"expected {self.expected}; " + "; ".join(self.problems))
        if self.sites:
            return RuleOutcome(self.id, "applied", self.sites, file)
        if self.has_fixed_shape:
            return RuleOutcome(self.id, "not_needed", 0, file, "the release already has the fixed shape")
        return RuleOutcome(self.id, "drift", 0, file, f"expected {self.expected}; found neither it nor the fixed shape")

    def on_visit(self, node: cst.CSTNode) -> bool:
        hooks = _hooks(type(self), type(node))
        for matcher in hooks.contexts:
            if matcher not in self.inside and m.matches(node, matcher):
                self.inside[matcher] = node
        for matcher, methods in hooks.visits:
            if m.matches(node, matcher):
                for method in methods:
                    if self._allowed(method):
                        method(self, node)
        return hooks.visit is None or not self._allowed(hooks.visit) or hooks.visit(self, node) is not False

    def on_leave(self, original_node: cst.CSTNode, updated_node: cst.CSTNode):
        hooks = _hooks(type(self), type(original_node))
        if hooks.leave is not None and self._allowed(hooks.leave):
            updated_node = hooks.leave(self, original_node, updated_node)
        for matcher, methods in hooks.leaves:
            if m.matches(original_node, matcher):
                for method in methods:
                    if isinstance(updated_node, cst.CSTNode) and self._allowed(method):
                        updated_node = method(self, original_node, updated_node)
        for matcher in hooks.contexts:
            if self.inside.get(matcher) is original_node:
                del self.inside[matcher]
        return updated_node

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        method = _hooks(type(self), type(node)).visit_attributes.get(attribute)
        if method is not None and self._allowed(method):
            method(self, node)

    def on_leave_attribute(self, original_node: cst.CSTNode, attribute: str) -> None:
        method = _hooks(type(self), type(original_node)).leave_attributes.get(attribute)
        if method is not None and self._allowed(method):
            method(self, original_node)

    def _allowed(self, method: Callable) -> bool:
        """Whether ``method``'s ``call_if_inside`` and ``call_if_not_inside`` matchers let it run now."""
        return all(matcher in self.inside for matcher in getattr(method, VISIT_POSITIVE_MATCHER_ATTR, ())) and not any(
            matcher in self.inside for matcher in getattr(method, VISIT_NEGATIVE_MATCHER_ATTR, ())
        )


@dataclass(frozen=True)
class _Hooks:
    """What a rule class runs on one type of node: its ``m.visit`` and ``m.leave`` methods by matcher, in the order
    ``m.MatcherDecoratableTransformer`` calls them, and the ``visit_``/``leave_`` methods it overrides."""

    contexts: tuple[m.BaseMatcherNode, ...]  # ``call_if_inside``/``call_if_not_inside`` matchers of this node type
    visits: tuple[tuple[m.BaseMatcherNode, tuple[Callable, ...]], ...]
    leaves: tuple[tuple[m.BaseMatcherNode, tuple[Callable, ...]], ...]
    visit: Callable | None
    leave: Callable | None
    visit_attributes: dict[str, Callable]
    leave_attributes: dict[str, Callable]


@cache
def _hooks(rule: type[Rule], node: type[cst.CSTNode]) -> _Hooks:
    visits, leaves, contexts, own = _methods(rule)
    visit, leave = f"visit_{node.__name__}", f"leave_{node.__name__}"
    return _Hooks(
        contexts=tuple(matcher for matcher in contexts if node in _node_types(matcher)),
        visits=tuple(item for item in visits.items() if node in _node_types(item[0])),
        leaves=tuple(item for item in reversed(leaves.items()) if node in _node_types(item[0])),
        visit=own.get(visit),
        leave=own.get(leave),
        visit_attributes={name.removeprefix(f"{visit}_"): own[name] for name in own if name.startswith(f"{visit}_")},
        leave_attributes={name.removeprefix(f"{leave}_"): own[name] for name in own if name.startswith(f"{leave}_")},
    )


@cache
def _methods(rule: type[Rule]) -> tuple[dict, dict, tuple[m.BaseMatcherNode, ...], dict[str, Callable]]:
    """The ``m.visit`` and ``m.leave`` methods of ``rule`` by matcher and its ``call_if_inside`` and
    ``call_if_not_inside`` matchers, gathered as ``m.MatcherDecoratableTransformer`` gathers them, and the
    ``visit_``/``leave_`` methods it overrides, by name."""
    visits: dict[m.BaseMatcherNode, tuple[Callable, ...]] = {}
    leaves: dict[m.BaseMatcherNode, tuple[Callable, ...]] = {}
    contexts: dict[m.BaseMatcherNode, None] = {}
    own: dict[str, Callable] = {}
    for name in dir(rule):
        method = getattr(rule, name)
        if name.startswith(("visit_", "leave_")) and method is not getattr(cst.CSTTransformer, name, None):
            own[name] = method
        for matcher in getattr(method, CONSTRUCTED_VISIT_MATCHER_ATTR, ()):
            visits[matcher] = (*visits.get(matcher, ()), method)
        for matcher in getattr(method, CONSTRUCTED_LEAVE_MATCHER_ATTR, ()):
            leaves[matcher] = (*leaves.get(matcher, ()), method)
        for attribute in (VISIT_POSITIVE_MATCHER_ATTR, VISIT_NEGATIVE_MATCHER_ATTR):
            contexts.update(dict.fromkeys(getattr(method, attribute, ())))
    return visits, leaves, tuple(contexts), own


def _node_types(matcher: m.BaseMatcherNode) -> set[type[cst.CSTNode]]:
    """The LibCST node classes ``matcher`` (a node matcher, or ``|`` and ``&`` of them) can match."""
    if isinstance(matcher, (m.OneOf, m.AllOf)):
        return set().union(*map(_node_types, matcher.options))
    return {getattr(cst, type(matcher).__name__)}
