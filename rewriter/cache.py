"""Content-addressed entries of patched source: one folder per key, a manifest written last, atomic files.

A reader trusts an entry only when its manifest parses, names the key asked for, and every file's sha256 matches.
Every failure to read or write is a miss for the caller, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rewriter.report import RuleOutcome

SCHEMA = 1
MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def entry_key(components: dict) -> str:
    """The key of an entry: a sha256 over every input that decides its output (never over the machine)."""
    return sha256(json.dumps({"schema": SCHEMA, **components}, sort_keys=True))


@dataclass(frozen=True)
class Entry:
    folder: Path
    texts: dict[str, str]
    outcomes: tuple[RuleOutcome, ...]

    def path(self, target: str) -> Path:
        return self.folder / "transformers" / target


class Cache:
    """Entries under one root folder, each in ``root/<key>/``."""

    def __init__(self, root: Path):
        self.root = root

    def load(self, key: str) -> Entry | None:
        folder = self.root / key
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            if manifest["schema"] != SCHEMA or manifest["key"] != key:
                raise ValueError("the manifest names another key or schema")
            texts = {}
            for target, digest in manifest["files"].items():
                data = (folder / "transformers" / target).read_bytes()
                if sha256(data) != digest:
                    raise ValueError(f"{target} does not match its sha256 in the manifest")
                texts[target] = data.decode()
            outcomes = tuple(RuleOutcome(**outcome) for outcome in manifest["outcomes"])
        except (FileNotFoundError, NotADirectoryError):  # no entry: a plain miss
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("rewriter: ignoring cache entry %s: %s", folder, error)
            return None
        return Entry(folder, texts, outcomes)

    def store(self, key: str, texts: dict[str, str], outcomes: tuple[RuleOutcome, ...], components: dict) -> Entry:
        """Write an entry (files first, manifest last); raises ``OSError`` if the root is not writable."""
        folder = self.root / key
        entry = Entry(folder, texts, outcomes)
        for target, text in texts.items():
            write_atomic(entry.path(target), text)
        manifest = {
            "schema": SCHEMA,
            "key": key,
            "components": components,
            "files": {target: sha256(text) for target, text in texts.items()},
            "outcomes": [asdict(outcome) for outcome in outcomes],
        }
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return entry


def write_atomic(path: Path, text: str) -> None:
    """Write a temp file in the same folder, then rename it over ``path``: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
    try:
        os.replace(f.name, path)
    except OSError:
        os.unlink(f.name)
        raise
