"""The rich tables of rule outcomes that the command line and the demo print."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from rewriter.report import CompileReport, RuleOutcome

STATUS_STYLE = {"applied": "green", "not_needed": "cyan", "drift": "bold red"}


def status(outcome: RuleOutcome) -> str:
    """The outcome's status, coloured."""
    return f"[{STATUS_STYLE[outcome.status]}]{outcome.status}[/]"


def report_table(report: CompileReport) -> Table:
    title = f"rewriter {report.family}: transformers {report.transformers_version}, from {report.origin}"
    return outcomes_table(title, report.outcomes)


def outcomes_table(title: str, outcomes: tuple[RuleOutcome, ...]) -> Table:
    table = Table(title=title)
    for column in ("rule", "file", "status", "sites", "detail"):
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(outcome.rule, outcome.file, status(outcome), str(outcome.sites), escape(outcome.detail))
    return table


def releases_table(title: str, rows: list[tuple[str, str, RuleOutcome]]) -> Table:
    """One row per ``(release, family, outcome)``."""
    table = Table(title=title)
    for column in ("release", "family", "rule", "status", "sites", "detail"):
        table.add_column(column)
    for release, family, outcome in rows:
        table.add_row(release, family, outcome.rule, status(outcome), str(outcome.sites), escape(outcome.detail))
    return table
