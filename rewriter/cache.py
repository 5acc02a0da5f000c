"""Content-addressed cache entries of patched source, safe to share between processes and to ship in a wheel.

An entry is a folder named by its key holding the patched files under ``transformers/`` and ``manifest.json``.
A writer builds it in a fresh folder of its own and renames that into place, so an entry is whole or absent and
nothing is ever written into a folder someone else could have prepared. A reader trusts an entry only when its
manifest names the key, its components hash to that key, its digest covers the rest of it, its outcomes and install
plans have the shape rewriter writes, and it holds exactly the files listed, each matching its sha256; in a user's
cache the folders and files must also be the user's (or root's), writable by nobody else, and no symlinks. Every
failure to read or write is a logged miss, never a crash.
"""

from __future__ import annotations

import contextlib
import errno
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
from typing import get_args

from rewriter.families import module_name
from rewriter.install import ModulePatch
from rewriter.report import RuleOutcome, Status

SCHEMA = 2
MANIFEST = "manifest.json"
LOCKS = ".locks"
BUILDING = ".building-"  # a writer's private folder, renamed into place when whole
REPLACED = ".replaced-"  # an untrusted entry moved aside, then removed
logger = logging.getLogger(__name__)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def entry_key(components: dict) -> str:
    """A sha256 over every input that decides an entry's output; nothing that only describes the machine."""
    return sha256(json.dumps({"schema": SCHEMA, **components}, sort_keys=True))


def manifest_digest(manifest: dict) -> str:
    """A sha256 over everything in a manifest but its ``built`` record, so that an edited outcome or plan is seen."""
    covered = {name: value for name, value in manifest.items() if name not in ("built", "digest")}
    return sha256(json.dumps(covered, sort_keys=True))


class UntrustedError(OSError):
    """A cache folder or file that someone else could have written: never read, never written into."""


class StoreError(OSError):
    """An entry could not be written; the message says what happened."""


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

    The root is made absolute once, so that a relative folder means the same one for the whole run. Shipped entries
    are trusted as much as the installed package itself, and still checked against their hashes.
    """

    def __init__(self, root: str | os.PathLike, *, shipped: bool = False):
        self.root = Path(os.path.abspath(root))
        self.shipped = shipped

    def read(self, key: str) -> Entry:
        """The entry ``key``, checked; ``OSError`` or ``ValueError`` says why not."""
        if not self.shipped:
            check_trusted(self.root)
        return read_entry(self.root / key, key, check=not self.shipped)

    def load(self, key: str) -> Entry | None:
        """The entry ``key``, or ``None`` on a miss; a bad entry is a logged miss."""
        if not os.path.lexists(self.root / key):
            return None
        try:
            return self.read(key)
        except (OSError, ValueError) as error:
            logger.warning("rewriter: not using cache entry %s: %s", self.root / key, error)
            return None

    def store(self, key, texts: dict[str, str], outcomes, patches: dict[str, ModulePatch], components, *, release=""):
        """Write the entry into a fresh folder of this writer, then rename it into place (an untrusted entry there
        is moved aside and removed whole, never written into).

        Raises ``OSError`` (``UntrustedError``, ``StoreError``) when the root cannot safely take it.
        """
        manifest = {
            "schema": SCHEMA,
            "key": key,
            "components": components,
            "files": {target: sha256(text) for target, text in texts.items()},
            "outcomes": [asdict(outcome) for outcome in outcomes],
            "patches": {target: asdict(patch) for target, patch in patches.items()},
            "transformers": release,
        }
        manifest.update(digest=manifest_digest(manifest), built=_built())
        try:
            make_dirs(self.root)
            check_trusted(self.root)
            building = Path(tempfile.mkdtemp(prefix=f"{BUILDING}{key[:16]}-", dir=self.root))
            try:
                for target, text in texts.items():
                    _write_new(building / "transformers" / target, text)
                _write_new(building / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                os.chmod(building, 0o755)
                self._publish(building, key)
            finally:
                shutil.rmtree(building, ignore_errors=True)  # gone already when it was published
        except UntrustedError:
            raise
        except OSError as error:
            raise StoreError(_why_not_stored(self.root, error)) from error
        return Entry(self.root / key, texts, tuple(outcomes), patches)

    def _publish(self, building: Path, key: str) -> None:
        """Rename ``building`` to ``key``. An entry already there stays when it checks (another writer's, the same
        bytes); otherwise it is moved aside and removed."""
        folder = self.root / key
        for _ in range(3):
            try:
                os.rename(building, folder)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
            if self.verify(key) is None:
                return
            with contextlib.suppress(FileNotFoundError):  # a concurrent writer may have moved it already
                self.remove(key)
        raise StoreError(f"{folder} kept changing while this entry was published")

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
        except (OSError, ValueError) as error:
            return str(error)
        return None

    def size(self) -> int:
        return sum(path.stat().st_size for key in self.keys() for path in (self.root / key).rglob("*") if path.is_file())

    def remove(self, key: str) -> None:
        """Move the entry aside, then delete it, so that a writer publishing ``key`` meanwhile is never mixed in."""
        aside = Path(tempfile.mkdtemp(prefix=REPLACED, dir=self.root))
        try:
            os.rename(self.root / key, aside / key)
        finally:
            _remove(aside)

    def clear(self) -> int:
        """Remove every entry, the locks, and what writers that were killed left behind."""
        keys = self.keys()
        for key in keys:
            with contextlib.suppress(FileNotFoundError):  # a concurrent writer replaced or removed it
                self.remove(key)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name == LOCKS or path.name.startswith((BUILDING, REPLACED)):
                    shutil.rmtree(path, ignore_errors=True)
        return len(keys)


def read_entry(folder: Path, key: str, *, check: bool) -> Entry:
    """Read and check the entry in ``folder``; ``OSError`` or ``ValueError`` says what is wrong with it."""
    if check:
        check_trusted(folder)
        check_trusted(folder / MANIFEST)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the manifest is not JSON: {error}") from None
    files, outcomes, patches = _checked_manifest(manifest, key)
    on_disk = _entry_files(folder, check=check)
    expected = {MANIFEST, *(f"transformers/{target}" for target in files)}
    if on_disk != expected:
        extra, missing = sorted(on_disk - expected), sorted(expected - on_disk)
        raise ValueError(f"the entry's files are not the manifest's (extra: {extra}, missing: {missing})")
    texts = {}
    for target, digest in files.items():
        data = (folder / "transformers" / target).read_bytes()
        if sha256(data) != digest:
            raise ValueError(f"{target} does not match its sha256 in the manifest")
        texts[target] = data.decode()
    for target, patch in patches.items():
        patch.check(texts[target])
    return Entry(folder, texts, outcomes, patches)


def _checked_manifest(manifest, key: str) -> tuple[dict[str, str], tuple[RuleOutcome, ...], dict[str, ModulePatch]]:
    """The files, outcomes and install plans of a manifest; ``ValueError`` unless it is one rewriter wrote for
    ``key``, unedited."""
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or manifest.get("key") != key:
        raise ValueError(f"the manifest does not describe this key with schema {SCHEMA}")
    components = manifest.get("components")
    if not isinstance(components, dict) or entry_key(components) != key:
        raise ValueError("the manifest's key components do not hash to this key")
    if manifest.get("digest") != manifest_digest(manifest):
        raise ValueError("the manifest was edited: its digest does not match its content")
    sources, files = components.get("sources"), manifest.get("files")
    if not isinstance(sources, dict) or not isinstance(files, dict) or files.keys() != sources.keys():
        raise ValueError("the manifest does not list one patched file per source file")
    if not all(isinstance(digest, str) and len(digest) == 64 for digest in files.values()):
        raise ValueError("a file's sha256 in the manifest is not a sha256")
    outcomes = manifest.get("outcomes")
    if not isinstance(outcomes, list) or not outcomes:
        raise ValueError("the manifest has no list of rule outcomes")
    outcomes = tuple(_checked_outcome(outcome, files) for outcome in outcomes)
    patches = manifest.get("patches")
    changed = {target for target in files if files[target] != sources[target]}
    if not isinstance(patches, dict) or patches.keys() != changed:
        raise ValueError(f"the manifest's install plans are not one per changed file ({sorted(changed)})")
    patches = {target: ModulePatch.from_json(plan) for target, plan in patches.items()}
    for target, patch in patches.items():
        if patch.module != module_name(target):
            raise ValueError(f"the install plan of {target} names another module, {patch.module!r}")
    return files, outcomes, patches


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


def _entry_files(folder: Path, *, check: bool) -> set[str]:
    """The paths of the files in an entry, relative to it; every folder and file checked when ``check``.

    ``__pycache__`` folders are left out: pip byte-compiles the shipped entries, and rewriter never reads them.
    """
    found = set()
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name != "__pycache__"]
        for name in [*folders, *names]:
            path = Path(parent, name)
            if check:
                check_trusted(path)
            if name in names or path.is_symlink():
                found.add(str(path.relative_to(folder)))
    return found


def check_trusted(path: Path) -> None:
    """Raise ``UntrustedError`` unless ``path`` is no symlink, is the user's or root's, and only they can write it."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedError(f"{path} is a symlink")
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
        return f"a folder under {root} was removed while the entry was written (a concurrent `cache clear`?): {error}"
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


def _write_new(path: Path, text: str) -> None:
    """Write a file in a writer's private folder, creating its parents; it must not exist yet."""
    make_dirs(path.parent)
    with open(path, "x", encoding="utf-8") as file:
        file.write(text)
    os.chmod(path, 0o644)
