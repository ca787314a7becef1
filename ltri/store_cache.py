"""Stores kept for reuse: a text read once with ``--context`` is reopened, not read again, next time.

A cached store lives in ``<cache root>/stores/<key>`` (the cache root is ``$LTRI_CACHE``, else
``$XDG_CACHE_HOME/ltri``, else ``~/.cache/ltri``). The key hashes everything that decides what the
store holds: the text, the model, the payload dtype, the system prompt (it is read before the text)
and the config fields that shape a store (``stored_fields``); other settings (budget, chunk,
positions) may differ from run to run, as they may for ``--store``.

A process that uses an entry holds an exclusive lock on ``<key>.lock`` while it does: answering
writes new spans into the store, so two processes must not share one. An entry whose meta.json does
not say complete (an ingest that was killed) is never trusted: it is removed and read again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ltri.config import LtriConfig
from ltri.errors import LtriError
from ltri.model import cache_root, default_gguf_path, resolve_device, resolve_dtype
from ltri.store_files import VERSION, read_meta, stored_fields

STORES_DIR = "stores"


def store_key(text: str, model: str | None, config: LtriConfig, system: str | None) -> str:
    """The cache key of the store that reading text with this model, config and system prompt makes."""
    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    parts = {
        "version": VERSION,
        "text": hashlib.sha256(text.encode()).hexdigest(),
        "model": model_identity(model),
        "dtype": str(dtype).removeprefix("torch."),
        "system": system,
        "stored": stored_fields(config),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def model_identity(model: str | None) -> str:
    """The model a --model value names: the bundled GGUF file, a local path (absolute) or a hub id."""
    if model is None:
        gguf = default_gguf_path().resolve()
        return f"default:{gguf}:{gguf.stat().st_size}"
    path = Path(model).expanduser()
    return f"path:{path.resolve()}" if path.exists() else f"hub:{model}"


@dataclass(frozen=True)
class CachedStore:
    """One entry of the store cache: a store directory (maybe not there yet) and its lock file."""

    path: Path

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def is_complete(self) -> bool:
        """Whether the entry holds a store its writer finished (an incomplete or damaged one does not)."""
        try:
            read_meta(self.path)
        except LtriError:
            return False
        return True

    def clear(self) -> None:
        """Remove the store, so that a new one can be written in its place."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            raise LtriError(f"Cannot remove the cached store {self.path}: remove it by hand or use --no-cache.")

    @contextlib.contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the entry's lock while the block runs; yields False (holding nothing) when another
        process holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LtriError(
                f"Cannot keep stores in {self.path.parent} ({exc.strerror or exc}): set LTRI_CACHE to a writable "
                "directory, or pass --no-cache."
            ) from exc
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock


def cached_store(key: str, root: Path | None = None) -> CachedStore:
    """The cache entry for key under root (default: the ltri cache root)."""
    return CachedStore((root or cache_root()) / STORES_DIR / key)
