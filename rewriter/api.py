"""``rewriter.compile``, ``compile_on_import`` and ``restore``: patch model families' transformers code at start-up."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from rewriter import install as installer
from rewriter import onimport
from rewriter.cache import CacheDir, Entry, check_trusted, entry_key, sha256
from rewriter.families import FAMILIES, Family, get_family, installed_transformers, module_name, read_sources
from rewriter.report import CompileReport, RuleDriftError, RuleOutcome, drift_message

if TYPE_CHECKING:
    from rewriter.attention import CompiledAttention
    from rewriter.generation import CompiledDecoding

logger = logging.getLogger("rewriter")
_warned: set[str] = set()


@dataclass
class _Active:
    report: CompileReport
    texts: dict[str, str]
    installed: list[installer.Installed]
    attention: CompiledAttention | None = None
    decoding: CompiledDecoding | None = None

    def set_attention(self, spec: Family, compiled: bool) -> None:
        """Turn compiled attention on or off; the report says which, and why when it stays eager."""
        if compiled and self.attention is None:
            from rewriter.attention import compile_attention  # imports torch

            self.attention, status = compile_attention(module_name(spec.attention[0]), spec.attention[1])
            self.report = replace(self.report, attention=status)
        elif not compiled and self.attention is not None:
            self.attention.uninstall()
            self.attention = None
            self.report = replace(self.report, attention="eager")

    def set_decoding(self, spec: Family, unit: str | None) -> None:
        """Compile decode steps by ``unit`` ("forward", "layers") or not at all (``None``); the report says which."""
        if self.decoding is not None and self.decoding.unit != unit:
            self.decoding.uninstall()
            self.decoding = None
            self.report = replace(self.report, decode="eager")
        if unit is not None and self.decoding is None:
            from rewriter.generation import compile_decoding  # imports torch

            self.decoding, status = compile_decoding(spec.name, module_name(spec.attention[0]), unit)
            self.report = replace(self.report, decode=status)


_active: dict[str, _Active] = {}


def compile(
    family: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    use_shipped: bool = True,
    compile_attention: bool = False,
    compile_decode: str | None = None,
) -> CompileReport:
    """Rewrite ``family``'s transformers source with its rules, cache it, and install it into the live classes.

    Entries are looked up in the wheel's shipped cache (unless ``use_shipped=False`` or ``REWRITER_NO_SHIPPED=1``),
    then in ``cache_dir`` (else ``$REWRITER_CACHE_DIR``, else the user cache folder); a miss runs the LibCST rules
    and stores the result there, or keeps it in memory when that folder cannot be used. Calling it again with the
    same sources changes nothing. Drift is logged as a warning naming the rule, the file and the shape it
    expected; with ``strict=True`` it raises ``RuleDriftError`` before anything is installed. The families it
    ``requires`` (``trainer``) are compiled, with the same cache options, when the program imports their module.
    ``compile_attention=True`` also wraps the family's text attention in ``torch.compile`` (``rewriter.attention``),
    or says in ``report.attention`` why it stays eager. ``compile_decode="forward"`` or ``"layers"`` makes
    ``generate`` use a static cache and compiles each decode step as whole graphs (``rewriter.generation``);
    ``report.decode`` says which, or why it stays eager.
    """
    spec = get_family(family)
    if (compile_attention or compile_decode) and spec.attention is None:
        raise ValueError(f"{spec.name} has no compiled attention; families with one: {', '.join(_with_attention())}")
    _check_decode_unit(compile_decode, compile_attention)
    version, package = installed_transformers(spec)
    sources = read_sources(spec, package)
    components = key_components(spec, sources)
    key = entry_key(components)
    active = _active.get(spec.name)
    if active is not None and active.report.key == key:
        _check_drift(active.report, strict)
        active.set_attention(spec, compile_attention)
        active.set_decoding(spec, compile_decode)
        return active.report

    entry, where = _find_or_build(spec, version, sources, components, key, cache_dir, use_shipped)
    report = CompileReport(spec.name, version, key, where, str(entry.manifest) if entry.manifest else None, entry.outcomes)
    _check_drift(report, strict)

    for required in spec.requires:
        if required not in _active:
            compile_on_import(required, cache_dir=cache_dir, strict=strict, use_shipped=use_shipped)
    restore(spec.name)
    active = _Active(report, entry.texts, [])
    try:
        for target, patch in entry.patches.items():
            filename = f"<rewriter {key[:12]} transformers/{target}>"
            active.installed.append(installer.install(patch, entry.texts[target], filename))
    except BaseException:
        _uninstall(spec.name, active)
        raise
    _active[spec.name] = active
    active.set_attention(spec, compile_attention)
    active.set_decoding(spec, compile_decode)
    return active.report


def compile_on_import(*families: str, **options) -> dict[str, CompileReport]:
    """Compile each family (default: every family) when the program imports its modeling module, at once for those
    it already imported; the reports of those come back, the others are ``compiled(family)`` once imported.

    ``options`` are ``compile``'s. A family's patch runs right after transformers imports its module and before
    the import returns, so no model is built unpatched; a family whose module is never imported costs nothing.
    Errors (drift under ``strict``, an unsupported transformers) surface from that import.
    """
    specs = [get_family(name) for name in families or FAMILIES]
    for spec in specs:
        onimport.when_imported(spec.modeling_module, spec.name, lambda name=spec.name: compile(name, **options))
    return {spec.name: _active[spec.name].report for spec in specs if spec.name in _active}


def compiled(family: str) -> CompileReport | None:
    """The report of ``family``'s installed patch, or ``None`` while it is not installed."""
    active = _active.get(get_family(family).name)
    return active.report if active is not None else None


def patched_source(family: str, target: str) -> str | None:
    """The text of ``target`` (a file ``family`` patches, relative to the transformers package) as it now runs:
    patched, or upstream's where no rule changed it; ``None`` while the family is not compiled."""
    active = _active.get(get_family(family).name)
    return active.texts[target] if active is not None else None


def restore(family: str) -> bool:
    """Put back the original code of ``family``'s classes and stop patching it on import; ``False`` if nothing
    was installed."""
    spec = get_family(family)
    active = _active.pop(spec.name, None)
    _uninstall(spec.name, active)
    return active is not None


def _uninstall(family: str, active: _Active | None) -> None:
    """Forget ``family``'s import hooks, and put back what ``active`` installed."""
    onimport.forget(family)
    if active is None:
        return
    if active.attention is not None:
        active.attention.uninstall()
    if active.decoding is not None:
        active.decoding.uninstall()
    for installed in reversed(active.installed):
        installer.uninstall(installed)


def attention_graphs(family: str) -> list[dict]:
    """The compiled attention variants of ``family``, why each exists, and their graph counts (none when eager)."""
    active = _active.get(get_family(family).name)
    return active.attention.graphs() if active is not None and active.attention is not None else []


def decode_graphs(family: str) -> list[dict]:
    """The compiled decoding variants of ``family``, why each exists, and their graph counts (none when eager)."""
    active = _active.get(get_family(family).name)
    return active.decoding.graphs() if active is not None and active.decoding is not None else []


def build(spec: Family, sources: dict[str, str]) -> tuple[dict[str, str], tuple[RuleOutcome, ...], dict]:
    """Run the rules (LibCST), validate their output, and plan how each patched module installs."""
    from rewriter.engine import rewrite, validate

    with _collector_paused():
        patched, outcomes = rewrite(spec, sources)
        trees = {target: validate(text, target) for target, text in patched.items()}
        patches = {
            target: installer.plan(module_name(target), sources[target], patched[target], trees[target])
            for target in spec.targets
            if patched[target] != sources[target]
        }
    return patched, outcomes, patches


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: the trees LibCST and ``ast`` build are acyclic (freed without it),
    and they allocate enough to set off full collections, each walking every object torch and transformers keep
    (about 0.2 s here, twice per cold compile). Cycles made meanwhile are collected once it runs again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def key_components(spec: Family, sources: dict[str, str]) -> dict:
    """Everything that decides an entry's content: the sources, and the code that rewrites them."""
    from rewriter import __version__

    return {
        "rewriter": __version__,
        "family": spec.name,
        "sources": {target: sha256(text) for target, text in sources.items()},
        "code": {path.name: sha256(path.read_bytes()) for path in spec.code_files()},
    }


def shipped_cache() -> CacheDir:
    # resolved: in a source checkout the package is a symlink to the top-level compiled_cache/
    return CacheDir(Path(importlib.util.find_spec("rewriter.compiled_cache").origin).resolve().parent, shipped=True)


def user_cache(cache_dir: str | os.PathLike | None = None) -> CacheDir:
    """``cache_dir``, else ``$REWRITER_CACHE_DIR`` (empty counts as unset), else the user cache folder. A relative
    folder is taken from the current directory; an empty ``cache_dir`` is refused rather than guessed."""
    if cache_dir is None:
        cache_dir = os.environ.get("REWRITER_CACHE_DIR") or platformdirs.user_cache_dir("rewriter")
    elif not os.fspath(cache_dir):
        raise ValueError("cache_dir is empty: pass None for the default cache folder, or '.' for the current one")
    return CacheDir(cache_dir)


def _find_or_build(spec, version, sources, components, key, cache_dir, use_shipped) -> tuple[Entry, str]:
    user = user_cache(cache_dir)
    if use_shipped and not os.environ.get("REWRITER_NO_SHIPPED"):
        entry = shipped_cache().load(key, sources)
        if entry is not None:
            return entry, "shipped"
    try:
        if user.root.exists():
            check_trusted(user.root)
    except OSError as error:
        _warn_once(str(user.root), f"rewriter: not using cache folder {user.root} ({error}); compiling in memory")
        return Entry(None, *build(spec, sources)), "memory"
    with user.lock(key):
        entry = user.load(key, sources)
        if entry is not None:
            return entry, "user_cache"
        texts, outcomes, patches = build(spec, sources)
        try:
            return user.store(key, sources, texts, outcomes, patches, components, release=version), "compiled"
        except OSError as error:
            _warn_once(str(user.root), f"rewriter: not storing the entry in {user.root}: {error}; compiling in memory")
            return Entry(None, texts, outcomes, patches), "memory"


def _check_decode_unit(unit: str | None, compile_attention: bool) -> None:
    if unit is None:
        return
    from rewriter.generation import UNITS  # imports torch

    if unit not in UNITS:
        raise ValueError(f"compile_decode must be one of {', '.join(UNITS)} or None, not {unit!r}")
    if compile_attention:
        raise ValueError("compile_decode compiles attention inside its graphs; leave compile_attention off")


def _with_attention() -> list[str]:
    return [name for name, spec in FAMILIES.items() if spec.attention is not None]


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(message)


def _check_drift(report: CompileReport, strict: bool) -> None:
    if report.drifted and strict:
        raise RuleDriftError(report.drifted)
    for outcome in report.drifted:
        logger.warning("rewriter: %s; left unpatched", drift_message(outcome))
