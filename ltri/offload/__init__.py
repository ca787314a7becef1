"""Span payload storage off the GPU (LMDB store, GPU span cache, pinned staging)."""

from ltri.offload.span_cache import SpanCache
from ltri.offload.span_store import SpanStore
from ltri.offload.staging import StagingPool

__all__ = ["SpanCache", "SpanStore", "StagingPool"]
