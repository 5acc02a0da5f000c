"""``python -m rewriter``: compile, diff, report, scan, the caches and the demo from the command line.

Exit codes: 0 all good; 1 a rule drifted or a cache entry is bad; 2 a usage error, an unknown family or an
unsupported transformers; 3 a source file does not parse; 4 a file or folder (a cache's included) cannot be read or
written; 5 a release wheel cannot be downloaded. On error, ``--json`` prints ``{"error", "kind", "exit_code"}``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rewriter.releases import FetchError
from rewriter.report import (
    RewriterError,
    RuleDriftError,
    SourceSyntaxError,
    UnsupportedTransformersError,
)
from rewriter.tables import outcomes_table, releases_table, report_table

# The kind of each error the command line reports, and its exit code; the first matching class wins.
ERRORS = (
    (RuleDriftError, "drift", 1),
    (UnsupportedTransformersError, "unsupported", 2),
    (SourceSyntaxError, "syntax", 3),
    (FetchError, "fetch", 5),
    (RewriterError, "usage", 2),
    (ValueError, "usage", 2),
    (OSError, "file", 4),
)

FUSED_LOSS = "with the opt-in fused loss: training forwards given labels return the loss and no logits"


def compile_command(args, console: Console) -> int:
    import rewriter

    report = rewriter.compile(
        args.family,
        cache_dir=args.cache_dir,
        strict=args.strict,
        compile_attention=args.compile_attention,
        compile_decode=args.compile_decode,
        fused_loss=args.fused_loss,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report_table(report))
        console.print(f"attention: {report.attention}")
        console.print(f"decode: {report.decode}")
    return 1 if report.drifted else 0


def diff_command(args, console: Console) -> int:
    """What the rules change, as unified diffs: those of the cache entry for these sources (``lookup``: the shipped
    cache, then the user's), exactly as stored, or those of a fresh rewrite when no cache holds one."""
    from rewriter.build import entry_key
    from rewriter.cache import lookup, unified_diff
    from rewriter.families import get_family, read_sources

    family = get_family(args.family, fused_loss=args.fused_loss)
    sources = read_sources(family, transformers_folder(family, args.source_dir))
    found = lookup(entry_key(family, sources)[0], sources, args.cache_dir)
    if found is not None:
        diffs, outcomes = found[0].diffs, found[0].outcomes
    else:
        _, patched, outcomes = rewrite_folder(family, args.source_dir)
        changed = [target for target in family.targets if patched[target] != sources[target]]
        diffs = {target: unified_diff(target, sources[target], patched[target]) for target in changed}
    sys.stdout.write("".join(diffs.values()))
    return 1 if any(outcome.status == "drift" for outcome in outcomes) else 0


def report_command(args, console: Console) -> int:
    """The rules' verdicts on a transformers source tree (an unzipped wheel), which is never imported."""
    from rewriter.families import get_family

    family = get_family(args.family, fused_loss=args.fused_loss)
    _, _, outcomes = rewrite_folder(family, args.source_dir)
    if args.json:
        print(json.dumps([asdict(outcome) for outcome in outcomes], indent=2))
    else:
        where = args.source_dir or "the installed transformers"
        console.print(outcomes_table(f"rewriter {family.name}: rules on {where}", outcomes))
    return 1 if any(outcome.status == "drift" for outcome in outcomes) else 0


def rewrite_folder(family, source_dir: str | None):
    """The sources of ``--source-dir`` (else of the installed transformers), what the rules make of them, and their
    outcomes; ``SourceSyntaxError`` when a source file does not parse."""
    import libcst

    from rewriter.engine import rewrite
    from rewriter.families import read_sources

    folder = transformers_folder(family, source_dir)
    sources = read_sources(family, folder)
    for target, text in sources.items():
        try:
            ast.parse(text, str(folder / target))
        except SyntaxError as error:
            raise SourceSyntaxError(f"{folder / target} does not parse: line {error.lineno}: {error.msg}") from None
    try:
        return (sources, *rewrite(family, sources))
    except libcst.ParserSyntaxError as error:
        raise SourceSyntaxError(f"LibCST cannot parse a source file in {folder}: {error.message}") from None


def transformers_folder(family, source_dir: str | None) -> Path:
    """``--source-dir`` (a transformers package folder), else the installed transformers, version-checked against
    ``family`` when one is given."""
    from rewriter.families import installed_package, installed_transformers

    if source_dir == "":
        raise ValueError("--source-dir is empty: name a transformers package folder, or leave it out")
    if source_dir is not None:
        return Path(source_dir)
    return installed_transformers(family)[1] if family is not None else installed_package()


def cache_command(args, console: Console) -> int:
    from rewriter.build import entry_key
    from rewriter.cache import caches
    from rewriter.families import FAMILIES, installed_version, read_sources

    locations = caches(args.cache_dir)  # as compile reads them
    if args.action == "clear":
        user = locations["user_cache"]
        console.print(f"removed {user.clear()} entries from {user.root}")
        return 0
    installed = {}  # key of each family's entry for these sources -> (family, its sources), opt-in features too
    for family in FAMILIES.values():
        try:
            sources = read_sources(family, transformers_folder(family, args.source_dir))
        except RewriterError:  # not this family's release, or not its files
            continue
        for variant in (family, family.with_every_feature()) if family.opt_in else (family,):
            installed[entry_key(variant, sources)[0]] = variant, sources
    if args.action == "verify":
        return verify_caches(locations, installed, args.deep, console)
    if args.json:
        entries = [
            {"family": family.label, "key": key, **{name: key in cache.keys() for name, cache in locations.items()}}
            for key, (family, _) in installed.items()
        ]
        print(json.dumps(entries, indent=2))
        return 0
    what = args.source_dir or f"installed transformers: {installed_version()}"
    table = Table(title=f"rewriter caches; {what}")
    for column in ("location", "folder", "entries", "bytes", "families with an entry here"):
        table.add_column(column)
    for name, cache in locations.items():
        hits = ", ".join(family.label for key, (family, _) in installed.items() if key in cache.keys()) or "none"
        table.add_row(name, str(cache.root), str(len(cache.keys())), f"{cache.size():,}", hits)
    console.print(table)
    return 0


def verify_caches(locations: dict, installed: dict, deep: bool, console: Console) -> int:
    """Check every entry, the patched texts of those in ``installed`` (``{key: (family, sources)}`` of the
    installed release) too; with ``deep``, also rebuild those and compare them byte for byte."""
    from rewriter.build import compare_with_rebuild

    checked = bad = rebuilt = 0
    for name, cache in locations.items():
        for key in cache.keys():
            checked += 1
            family, sources = installed.get(key, (None, None))
            why = cache.verify(key, sources)
            if why is None and deep and sources is not None:
                rebuilt += 1
                why = compare_with_rebuild(cache.read(key, sources), family, sources)
            if why is not None:
                bad += 1
                where = escape(str(cache.manifest(key)))
                console.print(f"[bold red]bad[/] {name} entry {where}: {escape(why)}", soft_wrap=True)
    console.print(f"{checked - bad} of {checked} entries check")
    if deep:
        console.print(f"{rebuilt} rebuilt from the installed transformers and compared byte for byte")
    return 1 if bad else 0


def prebuild_command(args, console: Console) -> int:
    from rewriter.cache import shipped_cache
    from rewriter.prebuild import plan, prebuild

    out = Path(args.out) if args.out else shipped_cache().root
    total = len(plan(args.releases or None))
    for done, (family, release, key, built) in enumerate(prebuild(out, args.releases or None), 1):
        console.print(f"[{done}/{total}] {family} on transformers {release}: {key} {'built' if built else 'kept'}")
    return 0


def releases_command(args, console: Console) -> int:
    """Every rule's verdict on each transformers release newer than the list on PyPI (or on the releases named); with
    ``--add``, unless a rule drifted, they join the list (``rewriter/releases.txt``) and get shipped entries."""
    from packaging.version import Version

    from rewriter.build import build
    from rewriter.cache import shipped_cache
    from rewriter.families import FAMILIES
    from rewriter.prebuild import prebuild
    from rewriter.releases import RELEASES, add_releases, fetch_wheel, pypi_releases, wheel_sources

    newest = Version(RELEASES[-1])
    versions = args.versions or [release for release in pypi_releases() if Version(release) > newest]
    versions = [version for version in versions if any(family.supports(version) for family in FAMILIES.values())]
    rows = []
    for version in versions:
        wheel = fetch_wheel(version)
        for family in (family.with_every_feature() for family in FAMILIES.values() if family.supports(version)):
            rows += [(version, family.name, outcome) for outcome in build(family, wheel_sources(wheel, family.targets))[1]]
    drifted = any(outcome.status == "drift" for _, _, outcome in rows)
    if args.json:
        print(json.dumps([{"release": version, "family": name, **asdict(o)} for version, name, o in rows], indent=2))
    else:
        console.print(releases_table(f"rules on transformers {', '.join(versions) or '(no newer release on PyPI)'}", rows))
    if args.add and versions and not drifted:
        add_releases([version for version in versions if version not in RELEASES])
        for family, release, key, _ in prebuild(shipped_cache().root, versions):
            console.print(f"shipped {family} on transformers {release}: {key}")
    return 1 if drifted else 0


def scan_command(args, console: Console) -> int:
    """Where a known buggy shape appears in a transformers tree, for every family, patched by rewriter or not."""
    from rewriter.engine import scan

    found = scan(transformers_folder(None, args.source_dir))
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
    compile_.add_argument("--fused-loss", action="store_true", help=FUSED_LOSS)
    compile_.set_defaults(run=compile_command)
    diff = commands.add_parser("diff", help="print a unified diff of what the rules change (a cache entry's, if any)")
    diff.add_argument("family")
    diff.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    diff.add_argument("--cache-dir", help="user cache folder (default: $REWRITER_CACHE_DIR or the user cache)")
    diff.add_argument("--fused-loss", action="store_true", help=FUSED_LOSS)
    diff.set_defaults(run=diff_command)
    report = commands.add_parser("report", help="each rule's status on a transformers source tree, never imported")
    report.add_argument("family")
    report.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    report.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    report.add_argument("--fused-loss", action="store_true", help=FUSED_LOSS)
    report.set_defaults(run=report_command)
    cache = commands.add_parser("cache", help="inspect, check or empty the caches")
    cache.add_argument("action", choices=("info", "verify", "clear"))
    cache.add_argument("--cache-dir", help="user cache folder (default: $REWRITER_CACHE_DIR or the user cache)")
    cache.add_argument("--source-dir", help="info, verify --deep: these transformers sources instead of the installed")
    cache.add_argument("--json", action="store_true", help="info: one object per family with an entry's key")
    cache.add_argument(
        "--deep", action="store_true", help="verify: also rebuild each entry of the installed release and compare"
    )
    cache.set_defaults(run=cache_command)
    scan = commands.add_parser("scan", help="list every file of a transformers tree with a buggy shape a rule knows")
    scan.add_argument("--source-dir", help="a transformers package folder (an unzipped wheel) instead of the installed")
    scan.add_argument("--json", action="store_true", help="print the findings as JSON")
    scan.set_defaults(run=scan_command)
    prebuild = commands.add_parser("prebuild", help="generate the shipped entries for every family's releases")
    prebuild.add_argument("releases", nargs="*", help="versions or wheel paths (default: every family's releases)")
    prebuild.add_argument("--out", help="folder to write (default: the package's compiled_cache)")
    prebuild.set_defaults(run=prebuild_command)
    releases = commands.add_parser(
        "releases", help="every rule's verdict on transformers releases newer than the known ones, from PyPI"
    )
    releases.add_argument("versions", nargs="*", help="these releases instead of PyPI's newer ones")
    releases.add_argument(
        "--add", action="store_true", help="unless a rule drifted, add them to the release list and ship their entries"
    )
    releases.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    releases.set_defaults(run=releases_command)
    demo = commands.add_parser("demo", help="show each Gemma bug unpatched, compile, and show it fixed")
    demo.set_defaults(run=demo_command)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", 160)))
    try:
        return args.run(args, console)
    except (RewriterError, ValueError, OSError) as error:
        kind, code = next((kind, code) for kinds, kind, code in ERRORS if isinstance(error, kinds))
        message = " ".join(str(error).split())  # one line
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "kind": kind, "exit_code": code}))
        else:
            console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        return code
