"""The interface every rule implements: a LibCST transformer that fixes one bug and says what it saw.

Imported only when source must be rewritten; a cache hit never loads LibCST.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import libcst as cst
import libcst.matchers as m

from rewriter.report import RuleOutcome


class Rule(m.MatcherDecoratableTransformer):
    """One bug fix. A fresh instance visits one module once; which files a rule visits is the families' business
    (``rewriter.families``), so one rule serves every file that has its bug.

    Subclasses name the bug (``id``), text that every buggy file contains (``marker``: ``scan`` parses
    no other file), the top-level definitions they read (``scope``, a matcher: the rest of the file is not visited,
    which keeps a cold compile cheap) and the buggy shape they look for (``expected``, quoted in drift messages).
    While visiting they call ``rewrote()`` for each buggy place they fix, ``found_fixed()`` when they see the shape
    upstream already fixed, and ``drift(why)`` when a shape is only half recognised. ``check()`` runs after the visit.

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
        self.module = module
        body: list[cst.BaseStatement] = []
        for statement in module.body:
            visited = statement.visit(self) if m.matches(statement, self.scope) else statement
            body.extend(visited.nodes if isinstance(visited, cst.FlattenSentinel) else [visited])
        updated = module.with_changes(body=body)
        self.check()
        if self.problems:
            outcome = RuleOutcome(self.id, "drift", 0, file, f"expected {self.expected}; " + "; ".join(self.problems))
        elif self.sites:
            return updated, RuleOutcome(self.id, "applied", self.sites, file)
        elif self.has_fixed_shape:
            outcome = RuleOutcome(self.id, "not_needed", 0, file, "the release already has the fixed shape")
        else:
            outcome = RuleOutcome(self.id, "drift", 0, file, f"expected {self.expected}; found neither it nor the fixed shape")
        return module, outcome
