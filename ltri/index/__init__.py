"""Span indexes (FAISS and exact torch backends) for the span memory policy."""

from __future__ import annotations

import torch

from ltri.config import INDEX_BACKENDS
from ltri.errors import LtriError
from ltri.index.base import SpanIndex, best_spans
from ltri.index.faiss_index import FaissSpanIndex
from ltri.index.torch_index import TorchSpanIndex

__all__ = [
    "FaissSpanIndex",
    "SpanIndex",
    "TorchSpanIndex",
    "best_spans",
    "index_class",
    "index_from_state",
    "make_index",
    "vector_dtype",
]


def index_class(backend: str, device: torch.device | str) -> type[SpanIndex]:
    """The backend's class; "auto" is torch on CUDA (the layer's own device) and FAISS on the CPU."""
    if backend not in INDEX_BACKENDS:
        raise LtriError(f"Unknown index backend {backend!r}; choose one of {', '.join(INDEX_BACKENDS)}.")
    if backend == "auto":
        backend = "torch" if torch.device(device).type == "cuda" else "faiss"
    return TorchSpanIndex if backend == "torch" else FaissSpanIndex


def make_index(
    backend: str, nheads_kv: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> SpanIndex:
    """An empty index for one layer: backend "torch", "faiss" or "auto"; dtype: how torch keeps the vectors
    (FAISS keeps float32)."""
    return index_class(backend, device)(nheads_kv, dim, device, dtype)


def index_from_state(
    backend: str, state: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> SpanIndex:
    """An index rebuilt from any backend's state() (the state format is the same for all backends)."""
    return index_class(backend, device).from_state(state, device, dtype)


def vector_dtype(model_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """How a layer's index keeps its vectors: the model's dtype on CUDA (nothing lost, see TorchSpanIndex),
    float32 elsewhere (CPU matmuls in low precision are slow, and FAISS takes float32)."""
    return model_dtype if torch.device(device).type == "cuda" else torch.float32
