"""``python -m rewriter prebuild``: generate the shipped cache entries, one per supported transformers release."""

from __future__ import annotations

from pathlib import Path

from rewriter.api import build, key_components
from rewriter.cache import CacheDir, Entry, entry_key
from rewriter.families import Family
from rewriter.releases import fetch_wheel, wheel_sources, wheel_version


def prebuild(family: Family, out: Path, releases: list[str]) -> dict[str, str]:
    """Write an entry for each release (a version or a wheel path) into ``out``; remove entries of no release.

    Output depends only on the wheels and this code: an entry already present and verified is left untouched.
    Returns ``{release version: key}``.
    """
    cache = CacheDir(out, shipped=True)
    keys = {}
    for release in releases:
        wheel = Path(release) if release.endswith(".whl") else fetch_wheel(release)
        sources = wheel_sources(wheel, family.targets)
        components = key_components(family, sources)
        key = entry_key(components)
        keys[wheel_version(wheel)] = key
        if key in cache.keys() and cache.verify(key) is None:
            continue
        texts, outcomes, patches = build(family, sources)
        cache.store(key, texts, outcomes, patches, components, release=wheel_version(wheel))
    for stale in set(cache.keys()) - set(keys.values()):
        cache.remove(stale)
    return keys


def compare_with_rebuild(entry: Entry, family: Family, sources: dict[str, str]) -> str | None:
    """What differs between ``entry`` and what the rules build from ``sources`` now; ``None`` when nothing does.

    Catches what hashes cannot: a file edited together with its sha256 (and the manifest's digest).
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
