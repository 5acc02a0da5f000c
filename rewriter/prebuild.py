"""``python -m rewriter prebuild``: generate the shipped cache entries, one per family and supported release."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from packaging.specifiers import SpecifierSet

from rewriter.api import build, key_components
from rewriter.cache import CacheDir, Entry, entry_key
from rewriter.families import FAMILIES, Family
from rewriter.releases import fetch_wheel, wheel_sources, wheel_version


def prebuild(out: Path, releases: list[str] | None = None) -> Iterator[tuple[str, str, str]]:
    """Write an entry for each family on each release (a version or a wheel path) it supports into ``out``.

    Without ``releases``: every family's own releases, and entries of no family and release are removed. Output
    depends only on the wheels and this code: an entry already present and verified is left untouched.
    Yields ``(family, release version, key)`` as each entry is ready.
    """
    cache = CacheDir(out, shipped=True)
    keys = set()
    for family in FAMILIES.values():
        for release in releases or family.releases:
            wheel = Path(release) if release.endswith(".whl") else fetch_wheel(release)
            if wheel_version(wheel) not in SpecifierSet(family.supported):
                continue
            sources = wheel_sources(wheel, family.targets)
            components = key_components(family, sources)
            key = entry_key(components)
            keys.add(key)
            if key not in cache.keys() or cache.verify(key) is not None:
                cache.store(key, *build(family, sources), components, release=wheel_version(wheel))
            yield family.name, wheel_version(wheel), key
    if releases is None:
        for stale in set(cache.keys()) - keys:
            cache.remove(stale)


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
