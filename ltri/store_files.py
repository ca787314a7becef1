"""The files of a saved store besides the LMDB payloads (in ``spans/``): ``meta.json`` and ``state.pt``.

meta.json (versioned) says what made the store and whether it is complete:

    {"format": "ltri-store", "version": 1, "complete": bool, "model": {...fingerprints...},
     "config": {...}, "dtype": "float32", "tokens_seen": int, "state_sha256": str,
     "payloads": {"spans_per_layer": [...], "digest": str}, "saved_at": str}

A writer marks the store incomplete before it stores anything and complete only after the state and
the payloads are on disk, so a writer that was killed leaves a store that says so. Both files are
written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SpanConfig
from ltri.errors import LtriError

FORMAT = "ltri-store"
VERSION = 1
META_FILE = "meta.json"
STATE_FILE = "state.pt"
SPANS_DIR = "spans"  # the LMDB environment of the span payloads


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_meta(directory: Path, meta: dict) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta, "saved_at": datetime.now(timezone.utc).isoformat()}
    write_atomically(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def read_meta(directory: Path, require_complete: bool = True) -> dict:
    """The store's meta.json, checked for format, version and (unless require_complete is False)
    completeness; LtriError otherwise."""
    if not directory.is_dir():
        raise LtriError(f"Store {directory} does not exist: make one with `ltri ingest FILE --store {directory}`.")
    path = directory / META_FILE
    if not path.is_file():
        raise LtriError(f"{directory} is not an ltri store (it has no {META_FILE}).")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LtriError(f"The store at {directory} is damaged: its {META_FILE} cannot be read ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LtriError(f"{directory} is not an ltri store (its {META_FILE} is of another format).")
    if meta.get("version") != VERSION:
        raise LtriError(
            f"The store at {directory} has format version {meta.get('version')}, this ltri reads version {VERSION}: "
            "ingest the text again."
        )
    if require_complete and meta.get("complete") is not True:
        raise LtriError(
            f"The store at {directory} is incomplete: its writer stopped before finishing (killed or crashed); "
            "ingest the text again into an empty directory."
        )
    return meta


def write_state(directory: Path, state: dict) -> str:
    """Write state.pt; returns its sha256."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    write_atomically(directory / STATE_FILE, data)
    return hashlib.sha256(data).hexdigest()


def read_state(directory: Path, sha256: str) -> dict:
    path = directory / STATE_FILE
    if not path.is_file():
        raise LtriError(f"The store at {directory} is damaged: {STATE_FILE} is missing; ingest the text again.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise LtriError(f"The store at {directory} is damaged: {STATE_FILE} fails its checksum; ingest the text again.")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def config_to_dict(config: LtriConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> LtriConfig:
    values = dict(values)
    return LtriConfig(
        memory=MemoryConfig(**values.pop("memory")),
        spans=SpanConfig(**values.pop("spans")),
        retrieval=RetrievalConfig(**values.pop("retrieval")),
        **values,
    )


# memory settings of how decode steps run, not of what a store holds: a store reopens with either value, and the
# store cache's keys (``ltri.store_cache``) stay those of stores made before the field existed
DECODE_ONLY_MEMORY_FIELDS = ("row_cache",)


def stored_fields(config: LtriConfig) -> dict:
    """The config fields that shape what a store holds; a store is only reopened with the same ones."""
    memory = {k: v for k, v in dataclasses.asdict(config.memory).items() if k not in DECODE_ONLY_MEMORY_FIELDS}
    return {"memory": memory, "spans": dataclasses.asdict(config.spans)}


def stored_config(directory: str | os.PathLike) -> LtriConfig:
    """The config a saved store was made with (LtriError if it is not a complete store)."""
    return config_from_dict(read_meta(Path(directory))["config"])
