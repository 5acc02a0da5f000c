"""Structured results of a compile: what each rule did, and the errors a caller can catch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Status = Literal["applied", "not_needed", "drift"]


@dataclass(frozen=True)
class RuleOutcome:
    """What one rule found in its target file.

    ``applied``: the buggy shape was rewritten at ``sites`` places. ``not_needed``: the release already has the
    fixed shape. ``drift``: the target is missing or has a shape the rule does not know; nothing was rewritten.
    """

    rule: str
    status: Status
    sites: int = 0
    file: str = ""
    detail: str = ""


@dataclass(frozen=True)
class CompileReport:
    """The result of ``rewriter.compile``: one outcome per rule, and where the patched code came from (``origin``: the
    shipped cache, the user's cache, compiled now and stored there, or compiled into memory only)."""

    family: str
    transformers_version: str
    key: str
    origin: Literal["shipped", "user_cache", "compiled", "memory"]
    cache_path: str | None
    outcomes: tuple[RuleOutcome, ...] = field(default_factory=tuple)
    attention: str = "eager"
    decode: str = "eager"

    def outcome(self, rule: str) -> RuleOutcome:
        for outcome in self.outcomes:
            if outcome.rule == rule:
                return outcome
        raise KeyError(f"no rule {rule!r} in the {self.family} report")

    @property
    def drifted(self) -> tuple[RuleOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.status == "drift")

    def to_dict(self) -> dict:
        return asdict(self)


class RewriterError(Exception):
    """Base class of every error rewriter raises on purpose."""


class RuleDriftError(RewriterError):
    """A rule's target is missing or changed shape, and ``strict=True`` was asked for."""

    def __init__(self, outcomes: tuple[RuleOutcome, ...]):
        self.outcomes = outcomes
        super().__init__("; ".join(drift_message(outcome) for outcome in outcomes))


class SourceSyntaxError(RewriterError):
    """A transformers source file that rewriter was asked to read does not parse."""


class UnsupportedTransformersError(RewriterError):
    """The installed transformers cannot be patched: missing, outside the supported range, or without the model."""


def drift_message(outcome: RuleOutcome) -> str:
    return f"rule {outcome.rule!r} drifted in {outcome.file}: {outcome.detail}"
