"""``python -m rewriter prebuild``: generate the shipped cache entries, one per family and supported release."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rewriter.build import build, entry_key
from rewriter.cache import CacheDir
from rewriter.families import FAMILIES, Family
from rewriter.releases import fetch_wheel, wheel_sources, wheel_version


def plan(releases: list[str] | None = None) -> list[tuple[Family, str]]:
    """``(family, release)`` for each entry to make: every family on each of its releases, or on each of
    ``releases`` (versions or wheel paths) that it supports; ``ValueError`` for a release no family supports."""
    if releases is None:
        return [(family, release) for family in FAMILIES.values() for release in family.releases]
    versions = {release: wheel_version(Path(release)) if release.endswith(".whl") else release for release in releases}
    pairs = [
        (family, release) for family in FAMILIES.values() for release in releases if family.supports(versions[release])
    ]
    if unsupported := sorted(set(releases) - {release for _, release in pairs}):
        ranges = ", ".join(f"{family.name} {family.supported}" for family in FAMILIES.values())
        raise ValueError(f"no family supports transformers {', '.join(unsupported)} ({ranges})")
    return pairs


def prebuild(out: Path, releases: list[str] | None = None) -> Iterator[tuple[str, str, str, bool]]:
    """Write the entry of each ``plan(releases)`` pair into ``out``, fetching each release's wheel once.

    An entry already there that checks against its sources is kept, so an interrupted run picks up where it
    stopped; releases with the same sources share one entry, which names the first of them. The missing entries
    are built by one process per CPU this process may run on. Without ``releases``, entries of no family and
    release, and diffs no entry uses, are removed. Output depends only on the wheels and this code. Yields
    ``(family, release, key, built)`` as each entry is ready, in ``plan`` order.
    """
    cache = CacheDir(out, shipped=True)
    rows, missing = [], {}  # missing: key -> (the row that names the entry, family, sources, components)
    for family, release in plan(releases):
        wheel = Path(release) if release.endswith(".whl") else fetch_wheel(release)
        version, sources = wheel_version(wheel), wheel_sources(wheel, family.targets)
        key, components = entry_key(family, sources)
        if key not in missing and cache.verify(key, sources) is not None:
            missing[key] = (len(rows), family, sources, components)
        rows.append((family.name, version, key))
    with ProcessPoolExecutor(max_workers=max(1, min(len(missing), len(os.sched_getaffinity(0))))) as pool:
        builds = {key: pool.submit(build, family, sources) for key, (_, family, sources, _) in missing.items()}
        for row, (name, version, key) in enumerate(rows):
            built = key in missing and missing[key][0] == row
            if built:
                _, _, sources, components = missing[key]
                cache.store(key, sources, *builds[key].result(), components, release=version)
            yield name, version, key, built
    if releases is None:
        for stale in set(cache.keys()) - {key for _, _, key in rows}:
            cache.remove(stale)
        cache.collect()
