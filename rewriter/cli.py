"""``python -m rewriter``: compile, diff, report, scan, the caches and the demo from the command line."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rewriter.report import CompileReport, RewriterError, RuleOutcome

STATUS_STYLE = {"applied": "green", "not_needed": "cyan", "drift": "bold red"}


def report_table(report: CompileReport) -> Table:
    title = f"rewriter {report.family}: transformers {report.transformers_version}, from {report.source}"
    return outcomes_table(title, report.outcomes)


def outcomes_table(title: str, outcomes: tuple[RuleOutcome, ...]) -> Table:
    table = Table(title=title)
    for column in ("rule", "file", "status", "sites", "detail"):
        table.add_column(column)
    for outcome in outcomes:
        style = STATUS_STYLE[outcome.status]
        table.add_row(outcome.rule, outcome.file, f"[{style}]{outcome.status}[/]", str(outcome.sites), outcome.detail)
    return table


def compile_command(args, console: Console) -> int:
    import rewriter

    report = rewriter.compile(
        args.family,
        cache_dir=args.cache_dir,
        strict=args.strict,
        compile_attention=args.compile_attention,
        compile_decode=args.compile_decode,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report_table(report))
        console.print(f"attention: {report.attention}")
        console.print(f"decode: {report.decode}")
    return 1 if report.drifted else 0


def diff_command(args, console: Console) -> int:
    from rewriter.engine import rewrite
    from rewriter.families import get_family, read_sources

    family = get_family(args.family)
    sources = read_sources(family, transformers_folder(family, args.source_dir))
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


def report_command(args, console: Console) -> int:
    """The rules' verdicts on a transformers source tree (an unzipped wheel), which is never imported."""
    from rewriter.engine import rewrite
    from rewriter.families import get_family, read_sources

    family = get_family(args.family)
    _, outcomes = rewrite(family, read_sources(family, transformers_folder(family, args.source_dir)))
    if args.json:
        print(json.dumps([asdict(outcome) for outcome in outcomes], indent=2))
    else:
        where = args.source_dir or "the installed transformers"
        console.print(outcomes_table(f"rewriter {family.name}: rules on {where}", outcomes))
    return 1 if any(outcome.status == "drift" for outcome in outcomes) else 0


def transformers_folder(family, source_dir: str | None) -> Path:
    """``--source-dir`` (a transformers package folder), else the installed transformers, version-checked."""
    from rewriter.families import installed_transformers

    return Path(source_dir) if source_dir else installed_transformers(family)[1]


def cache_command(args, console: Console) -> int:
    from rewriter.api import key_components, shipped_cache, user_cache
    from rewriter.cache import entry_key
    from rewriter.families import FAMILIES, installed_transformers, installed_version, read_sources

    locations = {"shipped": shipped_cache(), "user": user_cache(args.cache_dir)}
    if args.action == "clear":
        console.print(f"removed {locations['user'].clear()} entries from {locations['user'].root}")
        return 0
    if args.action == "verify":
        bad = [
            (name, key, why)
            for name, cache in locations.items()
            for key in cache.keys()
            if (why := cache.verify(key)) is not None
        ]
        for name, key, why in bad:
            console.print(f"[bold red]bad[/] {name} entry {locations[name].root / key}: {why}")
        checked = sum(len(cache.keys()) for cache in locations.values())
        console.print(f"{checked - len(bad)} of {checked} entries check")
        return 1 if bad else 0
    keys = {}
    for name, family in FAMILIES.items():
        try:
            version, package = installed_transformers(family)
            keys[name] = entry_key(key_components(family, read_sources(family, package)))
        except RewriterError:
            pass
    table = Table(title=f"rewriter caches; installed transformers: {installed_version()}")
    for column in ("location", "folder", "entries", "bytes", "entries for the installed release"):
        table.add_column(column)
    for name, cache in locations.items():
        hits = ", ".join(family for family, key in keys.items() if key in cache.keys()) or "none"
        table.add_row(name, str(cache.root), str(len(cache.keys())), f"{cache.size():,}", hits)
    console.print(table)
    return 0


def prebuild_command(args, console: Console) -> int:
    from rewriter.api import shipped_cache
    from rewriter.prebuild import prebuild

    out = Path(args.out) if args.out else shipped_cache().root
    for family, release, key in prebuild(out, args.releases or None):
        console.print(f"{family} on transformers {release}: {out / key}")
    return 0


def scan_command(args, console: Console) -> int:
    """Where a known buggy shape appears in a transformers tree, for every family, patched by rewriter or not."""
    from rewriter.engine import scan
    from rewriter.families import installed_package

    found = scan(Path(args.source_dir) if args.source_dir else installed_package())
    if args.json:
        print(json.dumps([{"rule": o.rule, "file": o.file, "sites": o.sites} for o in found], indent=2))
    else:
        table = Table(title=f"known buggy shapes in {args.source_dir or 'the installed transformers'}")
        for column in ("rule", "file", "sites"):
            table.add_column(column)
        for outcome in found:
            table.add_row(outcome.rule, outcome.file, str(outcome.sites))
        console.print(table)
    return 0


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
    compile_.add_argument(
        "--compile-attention", action="store_true", help="also wrap text attention in torch.compile (or say why not)"
    )
    compile_.add_argument(
        "--compile-decode",
        choices=("forward", "layers"),
        help="generate with a static cache and compile each decode step: the whole forward, or each decoder layer",
    )
    compile_.set_defaults(run=compile_command)
    diff = commands.add_parser("diff", help="print a unified diff of what each rule changes")
    diff.add_argument("family")
    diff.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    diff.set_defaults(run=diff_command)
    report = commands.add_parser("report", help="each rule's status on a transformers source tree, never imported")
    report.add_argument("family")
    report.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    report.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    report.set_defaults(run=report_command)
    cache = commands.add_parser("cache", help="inspect, check or empty the caches")
    cache.add_argument("action", choices=("info", "verify", "clear"))
    cache.add_argument("--cache-dir", help="user cache folder (default: $REWRITER_CACHE_DIR or the user cache)")
    cache.set_defaults(run=cache_command)
    scan = commands.add_parser("scan", help="list every file of a transformers tree with a buggy shape a rule knows")
    scan.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    scan.add_argument("--json", action="store_true", help="print the findings as JSON")
    scan.set_defaults(run=scan_command)
    prebuild = commands.add_parser("prebuild", help="generate the shipped entries for every family's releases")
    prebuild.add_argument("releases", nargs="*", help="versions or wheel paths (default: every family's releases)")
    prebuild.add_argument("--out", help="folder to write (default: the package's compiled_cache)")
    prebuild.set_defaults(run=prebuild_command)
    demo = commands.add_parser("demo", help="show each Gemma bug unpatched, compile, and show it fixed")
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
