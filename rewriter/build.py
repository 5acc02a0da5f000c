"""Build a family's cache entry: the key of its sources and rules, the rules' rewrite, validation and install plans,
and where the entry comes from (a cache, else a build stored in the user's cache or kept in memory)."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

from rewriter import install as installer
from rewriter.cache import Entry, components_key, lookup, sha256, user_cache
from rewriter.families import Family, module_name
from rewriter.report import RuleOutcome

logger = logging.getLogger("rewriter")
_warned: set[str] = set()


def entry_key(family: Family, sources: dict[str, str]) -> tuple[str, dict]:
    """The key of ``family``'s entry for ``sources``, and the components it hashes: everything that decides the
    entry's content (the sources, and the code that rewrites them)."""
    from rewriter import __version__

    components = {
        "rewriter": __version__,
        "family": family.name,
        "features": list(family.features),
        "sources": {target: sha256(text) for target, text in sources.items()},
        "code": {path.name: sha256(path.read_bytes()) for path in family.code_files()},
    }
    return components_key(components), components


def build(family: Family, sources: dict[str, str]) -> tuple[dict[str, str], tuple[RuleOutcome, ...], dict]:
    """Run the rules (LibCST), validate their output, and plan how each patched module installs."""
    from rewriter.engine import rewrite, validate

    with _collector_paused():
        patched, outcomes = rewrite(family, sources)
        trees = {target: validate(text, target) for target, text in patched.items()}
        patches = {
            target: installer.plan(module_name(target), sources[target], patched[target], trees[target])
            for target in family.targets
            if patched[target] != sources[target]
        }
    return patched, outcomes, patches


def find_or_build(
    family: Family, release: str, sources: dict[str, str], key: str, components: dict, cache_dir=None, *, use_shipped=True
) -> tuple[Entry, str]:
    """``family``'s entry for ``sources`` (of ``entry_key``'s ``key`` and ``components``) and where it came from: a
    cache (``lookup``), else a build stored in the user's cache (``"compiled"``), or kept in memory when that cache
    cannot be used (``"memory"``, with a warning)."""
    found = lookup(key, sources, cache_dir, use_shipped=use_shipped)
    if found is not None:
        return found
    user = user_cache(cache_dir)
    why = user.why_untrusted()
    if why is not None:  # lookup skipped it unread
        _warn_once(str(user.root), f"rewriter: not using cache folder {user.root} ({why}); compiling in memory")
        return Entry(None, *build(family, sources)), "memory"
    with user.lock(key):
        entry = user.load(key, sources)  # built by another process while this one waited
        if entry is not None:
            return entry, "user_cache"
        texts, outcomes, patches = build(family, sources)
        try:
            return user.store(key, sources, texts, outcomes, patches, components, release=release), "compiled"
        except OSError as error:
            _warn_once(str(user.root), f"rewriter: not storing the entry in {user.root}: {error}; compiling in memory")
            return Entry(None, texts, outcomes, patches), "memory"


def compare_with_rebuild(entry: Entry, family: Family, sources: dict[str, str]) -> str | None:
    """What differs between ``entry`` (read with ``sources``) and what the rules build from ``sources`` now;
    ``None`` when nothing does.

    Catches what hashes cannot: a diff edited together with its name, its sha256 and the manifest's digest.
    """
    texts, outcomes, patches = build(family, sources)
    for target in sorted(texts.keys() | entry.texts.keys()):
        if texts.get(target) != entry.texts.get(target):
            return f"{target} differs from what the rules write for its sources"
    if outcomes != entry.outcomes:
        return "its rule outcomes differ from a rebuild's"
    if patches != entry.patches:
        return "its install plans differ from a rebuild's"
    return None


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


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(message)
