"""What a saved store holds, read from its meta.json alone (no model is loaded): for `ltri info`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ltri.store_files import read_meta


@dataclass(frozen=True)
class StoreInfo:
    path: str
    complete: bool  # False: its writer stopped before finishing (killed or crashed); not usable
    model: str | None  # the --model it was made with; None: the bundled default model
    model_type: str | None
    tokens: int
    spans: int  # all layers together
    layers: int
    size_bytes: int  # on disk, all files
    dtype: str | None
    config: dict
    saved_at: str | None


def store_info(directory: str | os.PathLike) -> StoreInfo:
    """The facts of the store in directory; LtriError if it is not a store at all (an incomplete one is)."""
    path = Path(directory)
    meta = read_meta(path, require_complete=False)
    model = meta.get("model") or {}
    counts = (meta.get("payloads") or {}).get("spans_per_layer") or []
    return StoreInfo(
        path=str(path),
        complete=meta.get("complete") is True,
        model=model.get("source"),
        model_type=model.get("model_type"),
        tokens=int(meta.get("tokens_seen") or 0),
        spans=sum(counts),
        layers=len(counts),
        size_bytes=sum(file.stat().st_size for file in path.rglob("*") if file.is_file()),
        dtype=meta.get("dtype"),
        config=meta.get("config") or {},
        saved_at=meta.get("saved_at"),
    )
