"""Span payload storage off the GPU (LMDB store, GPU span cache, pinned staging)."""
