"""``python -m rewriter``: compile, diff and demo from the command line."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from rewriter.report import CompileReport, RewriterError

STATUS_STYLE = {"applied": "green", "not_needed": "cyan", "drift": "bold red"}


def report_table(report: CompileReport) -> Table:
    table = Table(title=f"rewriter {report.family}: transformers {report.transformers_version}, from {report.source}")
    for column in ("rule", "file", "status", "sites", "detail"):
        table.add_column(column)
    for outcome in report.outcomes:
        style = STATUS_STYLE[outcome.status]
        table.add_row(outcome.rule, outcome.file, f"[{style}]{outcome.status}[/]", str(outcome.sites), outcome.detail)
    return table


def compile_command(args, console: Console) -> int:
    import rewriter

    report = rewriter.compile(args.family, cache_dir=args.cache_dir, strict=args.strict)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report_table(report))
    return 1 if report.drifted else 0


def diff_command(args, console: Console) -> int:
    from rewriter.engine import rewrite
    from rewriter.families import get_family, installed_transformers

    family = get_family(args.family)
    _, package = installed_transformers(family)
    sources = {target: (package / target).read_text(encoding="utf-8") for target in family.targets}
    patched, outcomes = rewrite(family, sources)
    for target in family.targets:
        sys.stdout.writelines(
            difflib.unified_diff(
                sources[target].splitlines(keepends=True),
                patched[target].splitlines(keepends=True),
                f"a/transformers/{target}",
                f"b/transformers/{target}",
            )
        )
    return 1 if any(outcome.status == "drift" for outcome in outcomes) else 0


def demo_command(args, console: Console) -> int:
    from rewriter import demo

    return 0 if demo.run(console) else 1


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="rewriter", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    compile_ = commands.add_parser("compile", help="rewrite, cache and install a family's fixes; print the report")
    compile_.add_argument("family")
    compile_.add_argument("--json", action="store_true", help="print the report as JSON")
    compile_.add_argument("--strict", action="store_true", help="fail on drift instead of warning")
    compile_.add_argument("--cache-dir", help="cache folder (default: $REWRITER_CACHE_DIR or the user cache)")
    compile_.set_defaults(run=compile_command)
    diff = commands.add_parser("diff", help="print a unified diff of what each rule changes")
    diff.add_argument("family")
    diff.set_defaults(run=diff_command)
    demo = commands.add_parser("demo", help="show each Gemma-4 bug unpatched, compile, and show it fixed")
    demo.set_defaults(run=demo_command)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", 160)))
    try:
        return args.run(args, console)
    except (RewriterError, ValueError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
