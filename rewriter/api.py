"""``rewriter.compile`` and ``rewriter.restore``: patch a model family's transformers code at start-up."""

from __future__ import annotations

import linecache
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from rewriter import install as installer
from rewriter.cache import Cache, entry_key, sha256
from rewriter.families import Family, get_family, installed_transformers, module_name
from rewriter.report import CompileReport, RuleDriftError, drift_message

logger = logging.getLogger("rewriter")
_warned_roots: set[Path] = set()


@dataclass
class _Active:
    report: CompileReport
    installed: list[installer.Installed]


_active: dict[str, _Active] = {}


def compile(family: str, *, cache_dir: str | os.PathLike | None = None, strict: bool = False) -> CompileReport:
    """Rewrite ``family``'s transformers source with its rules, cache it, and install it into the live classes.

    Calling it again with the same sources changes nothing. Drift is logged as a warning naming the rule, the file
    and the shape it expected; with ``strict=True`` it raises ``RuleDriftError`` before anything is installed.
    """
    spec = get_family(family)
    version, package = installed_transformers(spec)
    sources = {target: (package / target).read_text(encoding="utf-8") for target in spec.targets}
    components = _key_components(spec, sources)
    key = entry_key(components)
    active = _active.get(spec.name)
    if active is not None and active.report.key == key:
        _check_drift(active.report, strict)
        return active.report

    cache = Cache(_cache_root(cache_dir))
    entry = cache.load(key)
    if entry is not None:
        patched, outcomes, where, paths = entry.texts, entry.outcomes, "user_cache", entry.path
    else:
        patched, outcomes, where, paths = _rewrite(spec, sources, cache, key, components)
    report = CompileReport(spec.name, version, key, where, str(cache.root / key) if where != "memory" else None, outcomes)
    _check_drift(report, strict)

    patches = [
        installer.plan(module_name(target), sources[target], patched[target], str(paths(target)))
        for target in spec.targets
        if patched[target] != sources[target]
    ]
    restore(spec.name)
    installed: list[installer.Installed] = []
    try:
        for patch in patches:
            installed.append(installer.install(patch))
    except BaseException:
        for done in reversed(installed):
            installer.uninstall(done)
        raise
    _active[spec.name] = _Active(report, installed)
    return report


def restore(family: str) -> bool:
    """Put back the original code of ``family``'s classes; ``False`` if nothing was installed."""
    active = _active.pop(get_family(family).name, None)
    if active is None:
        return False
    for installed in reversed(active.installed):
        installer.uninstall(installed)
    return True


def _rewrite(spec: Family, sources: dict[str, str], cache: Cache, key: str, components: dict):
    from rewriter.engine import rewrite, validate  # LibCST is imported only on a cache miss

    patched, outcomes = rewrite(spec, sources)
    for target, text in patched.items():
        validate(text, target)
    try:
        entry = cache.store(key, patched, outcomes, components)
    except OSError as error:
        if cache.root not in _warned_roots:
            _warned_roots.add(cache.root)
            logger.warning("rewriter: cache folder %s is not writable (%s); compiling in memory", cache.root, error)
        return patched, outcomes, "memory", lambda target: _in_memory(key, target, patched[target])
    return patched, outcomes, "compiled", entry.path


def _in_memory(key: str, target: str, text: str) -> str:
    """A pseudo file name for patched source that could not be written, registered so tracebacks show its lines."""
    filename = f"<rewriter {key[:12]}>/transformers/{target}"
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    return filename


def _check_drift(report: CompileReport, strict: bool) -> None:
    if report.drifted and strict:
        raise RuleDriftError(report.drifted)
    for outcome in report.drifted:
        logger.warning("rewriter: %s; left unpatched", drift_message(outcome))


def _key_components(spec: Family, sources: dict[str, str]) -> dict:
    from rewriter import __version__

    return {
        "rewriter": __version__,
        "family": spec.name,
        "sources": {target: sha256(text) for target, text in sources.items()},
        "rules": {path.name: sha256(path.read_bytes()) for path in spec.rules_source_files()},
    }


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("REWRITER_CACHE_DIR") or platformdirs.user_cache_dir("rewriter"))
