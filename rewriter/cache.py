"""Content-addressed cache entries of patched source, safe to share between processes and to ship in a wheel.

An entry is a folder named by its key holding the patched files under ``transformers/`` and ``manifest.json``,
written last. A reader trusts an entry only when its manifest names the key, its components hash to that key,
and every file matches its sha256; in a user's cache the folders and files must also be the user's (or root's),
writable by nobody else, and no symlinks. Every failure to read or write is a logged miss, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from rewriter.install import ModulePatch
from rewriter.report import RuleOutcome

SCHEMA = 1
MANIFEST = "manifest.json"
LOCKS = ".locks"
logger = logging.getLogger(__name__)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def entry_key(components: dict) -> str:
    """A sha256 over every input that decides an entry's output; nothing that only describes the machine."""
    return sha256(json.dumps({"schema": SCHEMA, **components}, sort_keys=True))


class UntrustedError(OSError):
    """A cache folder or file that someone else could have written: never read, never written into."""


@dataclass(frozen=True)
class Entry:
    folder: Path
    texts: dict[str, str]
    outcomes: tuple[RuleOutcome, ...]
    patches: dict[str, ModulePatch]

    def path(self, target: str) -> Path:
        return self.folder / "transformers" / target


class CacheDir:
    """The entries under one root: the package's shipped ``compiled_cache`` (read-only) or a user's cache folder.

    Shipped entries are trusted as much as the installed package itself, and still checked against their hashes.
    """

    def __init__(self, root: Path, *, shipped: bool = False):
        self.root = root
        self.shipped = shipped

    def read(self, key: str) -> Entry:
        """The entry ``key``, checked; ``OSError``, ``ValueError``, ``KeyError`` or ``TypeError`` says why not."""
        if not self.shipped:
            check_trusted(self.root)
        return read_entry(self.root / key, key, check=not self.shipped)

    def load(self, key: str) -> Entry | None:
        """The entry ``key``, or ``None`` on a miss; a bad entry is a logged miss."""
        try:
            return self.read(key)
        except (FileNotFoundError, NotADirectoryError):  # no entry: a plain miss
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("rewriter: not using cache entry %s: %s", self.root / key, error)
            return None

    def store(self, key, texts: dict[str, str], outcomes, patches: dict[str, ModulePatch], components, *, release=""):
        """Publish an entry: each file via a temp file and ``os.replace``, the manifest last.

        Raises ``OSError`` (``UntrustedError`` included) when the root cannot safely take it.
        """
        make_dirs(self.root)
        check_trusted(self.root)
        folder = self.root / key
        if os.path.lexists(folder) and not _is_trusted(folder):
            _remove(folder)  # a planted symlink or foreign folder: replaced, never followed
        entry = Entry(folder, texts, tuple(outcomes), patches)
        for target, text in texts.items():
            write_atomic(entry.path(target), text)
        manifest = {
            "schema": SCHEMA,
            "key": key,
            "components": components,
            "files": {target: sha256(text) for target, text in texts.items()},
            "outcomes": [asdict(outcome) for outcome in outcomes],
            "patches": {target: asdict(patch) for target, patch in patches.items()},
            "transformers": release,
            "built": _built(),
        }
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return entry

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold a per-key file lock, so that processes starting together build an entry once. Best effort:
        without a lock (an unwritable root) work may be done twice, which the atomic publish makes harmless."""
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
        if not self.root.is_dir():
            return []
        return sorted(path.name for path in self.root.iterdir() if len(path.name) == 64 and not path.is_symlink())

    def verify(self, key: str) -> str | None:
        """Why the entry ``key`` cannot be trusted, or ``None`` when it checks."""
        try:
            self.read(key)
        except (OSError, ValueError, KeyError, TypeError) as error:
            return str(error)
        return None

    def size(self) -> int:
        return sum(path.stat().st_size for key in self.keys() for path in (self.root / key).rglob("*") if path.is_file())

    def remove(self, key: str) -> None:
        _remove(self.root / key)

    def clear(self) -> int:
        keys = self.keys()
        for key in keys:
            self.remove(key)
        shutil.rmtree(self.root / LOCKS, ignore_errors=True)
        return len(keys)


def read_entry(folder: Path, key: str, *, check: bool) -> Entry:
    if check:
        check_trusted(folder)
        check_trusted(folder / MANIFEST)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest["schema"] != SCHEMA or manifest["key"] != key or entry_key(manifest["components"]) != key:
        raise ValueError("the manifest does not describe this key")
    texts = {}
    for target, digest in manifest["files"].items():
        path = folder / "transformers" / target
        if check:
            for part in (path, *path.relative_to(folder).parents):
                check_trusted(folder / part)
        data = path.read_bytes()
        if sha256(data) != digest:
            raise ValueError(f"{target} does not match its sha256 in the manifest")
        texts[target] = data.decode()
    outcomes = tuple(RuleOutcome(**outcome) for outcome in manifest["outcomes"])
    patches = {target: ModulePatch.from_json(patch) for target, patch in manifest["patches"].items()}
    return Entry(folder, texts, outcomes, patches)


def check_trusted(path: Path) -> None:
    """Raise ``UntrustedError`` unless ``path`` is no symlink, is the user's or root's, and only they can write it."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedError(f"{path} is a symlink")
    if info.st_uid not in (os.getuid(), 0):
        raise UntrustedError(f"{path} is owned by another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedError(f"{path} is writable by its group or by everyone (mode {stat.filemode(info.st_mode)})")


def _is_trusted(path: Path) -> bool:
    try:
        check_trusted(path)
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


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


def write_atomic(path: Path, text: str) -> None:
    """Write a temp file in the same folder, then rename it over ``path``: readers see all of it or nothing."""
    make_dirs(path.parent)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
    try:
        os.chmod(f.name, 0o644)
        os.replace(f.name, path)
    except OSError:
        os.unlink(f.name)
        raise
