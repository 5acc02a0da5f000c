"""Content-addressed cache entries of patches, checked on every read, safe to share between processes and to ship
in a wheel: an entry is a manifest (``<key>.json``) and the unified diffs (``<sha256>.diff``) of the files it
changes. Format and trust model: docs/cache.md.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import get_args

import platformdirs

from rewriter.families import module_name
from rewriter.install import ModulePatch
from rewriter.report import RuleOutcome, Status

SCHEMA = 4  # 4: install plans list changed class attributes
LOCKS = ".locks"
WRITING = ".writing-"  # a file a writer has not renamed into place yet
SHA256 = re.compile(r"[0-9a-f]{64}")
HUNK = re.compile(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,\d+)? @@")
logger = logging.getLogger(__name__)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def components_key(components: dict) -> str:
    """An entry's key: a sha256 over every input that decides its output (its components, made by
    ``rewriter.build.entry_key``); nothing that only describes the machine."""
    return sha256(json.dumps({"schema": SCHEMA, **components}, sort_keys=True))


def manifest_digest(manifest: dict) -> str:
    """A sha256 over everything in a manifest but its ``built`` record, so that an edited outcome or plan is seen."""
    covered = {name: value for name, value in manifest.items() if name not in ("built", "digest")}
    return sha256(json.dumps(covered, sort_keys=True))


def unified_diff(target: str, source: str, patched: str) -> str:
    """What the rules changed in ``target``, as a unified diff that ``apply_diff`` turns back into ``patched``."""
    lines = difflib.unified_diff(
        source.split("\n"), patched.split("\n"), f"a/transformers/{target}", f"b/transformers/{target}", lineterm=""
    )
    return "\n".join(lines) + "\n"


def apply_diff(source: str, diff: str) -> str:
    """``source`` with ``diff`` applied; ``ValueError`` unless every hunk's context and removed lines are exactly there."""
    old, new, at = source.split("\n"), [], 0
    lines = diff.removesuffix("\n").split("\n")
    if len(lines) < 3 or not lines[0].startswith("--- ") or not lines[1].startswith("+++ "):
        raise ValueError("a diff has no file header")
    for line in lines[2:]:
        if hunk := HUNK.fullmatch(line):
            start = int(hunk[1]) - (hunk[2] != "0")  # an empty range names the line before it
            if start < at:
                raise ValueError("a diff's hunks overlap")
            new += old[at:start]
            at = start
        elif line[:1] == "+":
            new.append(line[1:])
        elif line[:1] in (" ", "-") and at < len(old) and old[at] == line[1:]:
            if line[0] == " ":
                new.append(old[at])
            at += 1
        else:
            raise ValueError("a diff does not apply to the installed source")
    return "\n".join(new + old[at:])


class UntrustedError(OSError):
    """A cache folder or file that someone else could have written: never read, never written into."""


class StoreError(OSError):
    """An entry could not be written; the message says what happened."""


@dataclass(frozen=True)
class Entry:
    """A checked entry: where its manifest is (``None`` when only in memory), each patched text, what the rules
    reported, how each changed module installs, and the diff of each changed file."""

    manifest: Path | None
    texts: dict[str, str]
    outcomes: tuple[RuleOutcome, ...]
    patches: dict[str, ModulePatch]
    diffs: dict[str, str] = field(default_factory=dict)


class CacheDir:
    """The entries in one folder: the package's shipped ``compiled_cache`` (read-only) or a user's cache folder.

    The root is made absolute once, so that a relative folder means the same one for the whole run. Shipped entries
    are trusted as much as the installed package itself, and still checked against their hashes.
    """

    def __init__(self, root: str | os.PathLike, *, shipped: bool = False):
        self.root = Path(os.path.abspath(root))
        self.shipped = shipped

    def why_untrusted(self) -> str | None:
        """Why the root cannot be trusted (``check_trusted``), or ``None`` when it can or does not exist yet."""
        try:
            if self.root.exists():
                check_trusted(self.root)
        except OSError as error:
            return str(error)
        return None

    def manifest(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read(self, key: str, sources: dict[str, str] | None = None) -> Entry:
        """The entry ``key``, checked, with its patched texts rebuilt from ``sources`` (without them: its manifest
        and diffs only, and no texts); ``OSError`` or ``ValueError`` says why not."""
        if not self.shipped:
            check_trusted(self.root)
        manifest = self._read_manifest(key)
        files, outcomes, patches, diff_names = _checked_manifest(manifest, key)
        diffs = {target: self._read_diff(target, name) for target, name in diff_names.items()}
        texts = {}
        if sources is not None:
            if {target: sha256(text) for target, text in sources.items()} != manifest["components"]["sources"]:
                raise ValueError("the entry was built from other sources than these")
            for target, text in sources.items():
                texts[target] = apply_diff(text, diffs[target]) if target in diffs else text
                if sha256(texts[target]) != files[target]:
                    raise ValueError(f"{target}, patched, does not match its sha256 in the manifest")
            for target, patch in patches.items():
                patch.check(texts[target])
        return Entry(self.manifest(key), texts, outcomes, patches, diffs)

    def _read_manifest(self, key: str) -> dict:
        """The manifest of ``key`` as JSON, unchecked; ``ValueError`` when it is not JSON."""
        try:
            return json.loads(self._read(self.manifest(key)))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the manifest is not JSON: {error}") from None

    def load(self, key: str, sources: dict[str, str]) -> Entry | None:
        """The entry ``key`` for ``sources``, or ``None`` on a miss; a bad entry is a logged miss."""
        if not os.path.lexists(self.manifest(key)):
            return None
        try:
            return self.read(key, sources)
        except (OSError, ValueError) as error:
            logger.warning("rewriter: not using cache entry %s: %s", self.manifest(key), error)
            return None

    def store(self, key, sources, texts, outcomes, patches, components, *, release="") -> Entry:
        """Write each changed file's diff (unless that diff is there already), then the manifest, each under a
        private name renamed into place.

        Raises ``OSError`` (``UntrustedError``, ``StoreError``) when the root cannot safely take it.
        """
        diffs = {target: unified_diff(target, sources[target], texts[target]) for target in patches}
        for target, diff in diffs.items():
            if apply_diff(sources[target], diff) != texts[target]:
                raise StoreError(f"the patch of {target} cannot be stored as a diff that rebuilds it")
        manifest = {
            "schema": SCHEMA,
            "key": key,
            "components": components,
            "files": {target: sha256(text) for target, text in texts.items()},
            "diffs": {target: sha256(diff) for target, diff in diffs.items()},
            "outcomes": [asdict(outcome) for outcome in outcomes],
            "patches": {target: asdict(patch) for target, patch in patches.items()},
            "transformers": release,
        }
        manifest.update(digest=manifest_digest(manifest), built=_built())
        try:
            make_dirs(self.root)
            check_trusted(self.root)
            for target, name in manifest["diffs"].items():
                try:
                    self._read_diff(target, name)  # another entry's, the same change: kept as it is
                except (OSError, ValueError):
                    self._write(self.root / f"{name}.diff", diffs[target])
            self._write(self.manifest(key), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        except UntrustedError:
            raise
        except OSError as error:
            raise StoreError(_why_not_stored(self.root, error)) from error
        return Entry(self.manifest(key), dict(texts), tuple(outcomes), dict(patches), diffs)

    def _read_diff(self, target: str, name: str) -> str:
        """The diff of ``target`` stored as ``name``; ``OSError`` when it cannot be read safely, ``ValueError``
        unless its bytes hash to its name."""
        data = self._read(self.root / f"{name}.diff")
        if sha256(data) != name:
            raise ValueError(f"the diff of {target} does not match its sha256 ({name}.diff)")
        return data.decode()

    def _read(self, path: Path) -> bytes:
        """The bytes of ``path``, never through a symlink; in a user's cache only a file of the user's that no one
        else can write."""
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UntrustedError(f"{path} is a symlink") from None
            raise
        with open(descriptor, "rb") as file:
            if not self.shipped:
                _check_owner_and_mode(path, os.fstat(file.fileno()))
            return file.read()

    def _write(self, path: Path, text: str) -> None:
        """Write ``text`` under a private name, then rename it to ``path`` (replacing a file or symlink there,
        never writing through it); nothing is left behind on failure."""
        descriptor, writing = tempfile.mkstemp(prefix=WRITING, dir=self.root)
        try:
            with open(descriptor, "w", encoding="utf-8", newline="") as file:
                file.write(text)
            os.chmod(writing, 0o644)
            os.rename(writing, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(writing)
            raise

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold a per-key file lock, so that processes starting together build an entry once. Best effort:
        without a lock (an unwritable root) work may be done twice, which the atomic renames make harmless."""
        import filelock

        try:
            make_dirs(self.root / LOCKS)
            lock = filelock.FileLock(self.root / LOCKS / f"{key}.lock", timeout=300)
            lock.acquire()
        except (OSError, filelock.Timeout):
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def keys(self) -> list[str]:
        return sorted(name for name in self._names(".json") if not self.manifest(name).is_symlink())

    def _names(self, suffix: str) -> list[str]:
        """The sha256 names of the files in the root ending with ``suffix``."""
        if not self.root.is_dir():
            return []
        return [path.stem for path in self.root.iterdir() if path.suffix == suffix and SHA256.fullmatch(path.stem)]

    def verify(self, key: str, sources: dict[str, str] | None = None) -> str | None:
        """Why the entry ``key`` cannot be trusted, or ``None`` when it checks (its patched texts too, given the
        ``sources`` it was built from)."""
        try:
            self.read(key, sources)
        except (OSError, ValueError) as error:
            return str(error)
        return None

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.root.iterdir() if path.is_file()) if self.root.is_dir() else 0

    def remove(self, key: str) -> None:
        """Remove the entry's manifest (its diffs may serve other entries: ``collect`` removes those no entry uses)."""
        self.manifest(key).unlink()

    def collect(self) -> int:
        """Remove the diffs that no entry names; how many. Not safe while another process stores entries."""
        used = set()
        for key in self.keys():
            with contextlib.suppress(OSError, ValueError):
                *_, diff_names = _checked_manifest(self._read_manifest(key), key)
                used.update(diff_names.values())
        unused = set(self._names(".diff")) - used
        for name in unused:
            (self.root / f"{name}.diff").unlink()
        return len(unused)

    def clear(self) -> int:
        """Remove every entry and diff, the locks, what killed writers left behind, and entries of older schemas."""
        keys = self.keys()
        if not self.root.is_dir():
            return 0
        for path in self.root.iterdir():
            name = path.name
            if name == LOCKS or name.startswith(WRITING) or SHA256.fullmatch(name.split(".")[0]):
                with contextlib.suppress(FileNotFoundError):  # a concurrent clear removed it
                    _remove(path)
        return len(keys)


def shipped_cache() -> CacheDir:
    """The entries shipped in the package, ``rewriter/compiled_cache``."""
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


def caches(cache_dir: str | os.PathLike | None = None, *, use_shipped: bool = True) -> dict[str, CacheDir]:
    """The caches entries are looked up in, in order, by where an entry found there comes from: the shipped one
    (unless ``use_shipped=False`` or ``$REWRITER_NO_SHIPPED`` is set), then the user's (``user_cache``)."""
    found = {"shipped": shipped_cache()} if use_shipped and not os.environ.get("REWRITER_NO_SHIPPED") else {}
    return {**found, "user_cache": user_cache(cache_dir)}


def lookup(key: str, sources: dict[str, str], cache_dir=None, *, use_shipped: bool = True) -> tuple[Entry, str] | None:
    """The entry ``key`` for ``sources`` from the first of ``caches`` that holds a good one, and that cache's
    name; ``None`` on a miss (a bad entry is a logged miss, a user cache folder someone else could write is skipped
    unread: ``check_trusted``)."""
    for name, cache in caches(cache_dir, use_shipped=use_shipped).items():
        if not cache.shipped and cache.why_untrusted() is not None:
            continue
        entry = cache.load(key, sources)
        if entry is not None:
            return entry, name
    return None


def _checked_manifest(manifest, key: str):
    """The files, outcomes, install plans and diff names of a manifest; ``ValueError`` unless it is one rewriter
    wrote for ``key``, unedited."""
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or manifest.get("key") != key:
        raise ValueError(f"the manifest does not describe this key with schema {SCHEMA}")
    components = manifest.get("components")
    if not isinstance(components, dict) or components_key(components) != key:
        raise ValueError("the manifest's key components do not hash to this key")
    if manifest.get("digest") != manifest_digest(manifest):
        raise ValueError("the manifest was edited: its digest does not match its content")
    sources, files = components.get("sources"), manifest.get("files")
    if not isinstance(sources, dict) or not isinstance(files, dict) or files.keys() != sources.keys():
        raise ValueError("the manifest does not list one patched file per source file")
    if not all(isinstance(digest, str) and SHA256.fullmatch(digest) for digest in files.values()):
        raise ValueError("a file's sha256 in the manifest is not a sha256")
    outcomes = manifest.get("outcomes")
    if not isinstance(outcomes, list) or not outcomes:
        raise ValueError("the manifest has no list of rule outcomes")
    outcomes = tuple(_checked_outcome(outcome, files) for outcome in outcomes)
    changed = {target for target in files if files[target] != sources[target]}
    patches, diffs = manifest.get("patches"), manifest.get("diffs")
    if not isinstance(patches, dict) or patches.keys() != changed:
        raise ValueError(f"the manifest's install plans are not one per changed file ({sorted(changed)})")
    if not isinstance(diffs, dict) or diffs.keys() != changed:
        raise ValueError(f"the manifest's diffs are not one per changed file ({sorted(changed)})")
    if not all(isinstance(name, str) and SHA256.fullmatch(name) for name in diffs.values()):
        raise ValueError("a diff's name in the manifest is not a sha256")
    patches = {target: ModulePatch.from_json(plan) for target, plan in patches.items()}
    for target, patch in patches.items():
        if patch.module != module_name(target):
            raise ValueError(f"the install plan of {target} names another module, {patch.module!r}")
    return files, outcomes, patches, diffs


def _checked_outcome(outcome, files: dict) -> RuleOutcome:
    """A ``RuleOutcome`` from a manifest; ``ValueError`` unless it is one a rule can report."""
    fields = {"rule": str, "status": str, "sites": int, "file": str, "detail": str}
    if (
        not isinstance(outcome, dict)
        or outcome.keys() != fields.keys()
        or not all(type(outcome[name]) is kind for name, kind in fields.items())
        or outcome["status"] not in get_args(Status)
        or outcome["file"] not in files
        or (outcome["status"] == "applied") != (outcome["sites"] > 0)
        or outcome["sites"] < 0
    ):
        raise ValueError(f"the manifest has an outcome no rule reports: {outcome!r}")
    return RuleOutcome(**outcome)


def check_trusted(path: Path) -> None:
    """Raise ``UntrustedError`` unless ``path`` is no symlink, is the user's or root's, and only they can write it."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedError(f"{path} is a symlink")
    _check_owner_and_mode(path, info)


def _check_owner_and_mode(path: Path, info: os.stat_result) -> None:
    if info.st_uid not in (os.getuid(), 0):
        raise UntrustedError(f"{path} is owned by another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedError(f"{path} is writable by its group or by everyone (mode {stat.filemode(info.st_mode)})")


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points at) or a folder."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _why_not_stored(root: Path, error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the device of {root}"
    if error.errno == errno.ENOENT:
        return f"a file under {root} was removed while the entry was written (a concurrent `cache clear`?): {error}"
    if error.errno == errno.ENOTDIR:
        return f"{root} is not a folder: {error}"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{root} is not writable: {error}"
    return str(error)


def _built() -> dict:
    """What built the entry, for people reading the manifest; never part of the key."""
    when = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(when), timezone.utc) if when else datetime.now(timezone.utc)
    return {"libcst": version("libcst"), "python": platform.python_version(), "at": moment.isoformat()}


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents writable by their owner only, whatever the umask."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o755)
