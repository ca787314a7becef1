"""Exact span search with torch: one batched matmul over all vectors, span max, top-k, on any device."""

from __future__ import annotations

import torch

from ltri.index.base import SpanIndex, SpanSlots, best_spans


class TorchSpanIndex(SpanIndex):
    """Vectors live in a float32 buffer on the layer's device whose capacity doubles when full."""

    def __init__(self, nheads_kv: int, dim: int, device: torch.device | str) -> None:
        self.nheads_kv = nheads_kv
        self.dim = dim
        self.device = torch.device(device)
        self._slots = SpanSlots()
        self._vectors = torch.empty(nheads_kv, 0, dim, device=self.device)  # (nheads_kv, capacity, dim)
        self._vector_slots = torch.empty(0, dtype=torch.long, device=self.device)  # (capacity,)
        self._slot_span_ids = torch.empty(0, dtype=torch.long, device=self.device)  # (n_spans,)
        self._length = 0

    @property
    def n_spans(self) -> int:
        return self._slots.n_spans

    @property
    def n_vectors(self) -> int:
        return self._length

    def add(self, vectors: torch.Tensor, span_ids: torch.Tensor) -> None:
        self._check_add(vectors, span_ids)
        n_new = vectors.shape[1]
        slots = self._slots.assign(span_ids)
        self._reserve(self._length + n_new)
        end = self._length + n_new
        self._vectors[:, self._length : end] = vectors.to(self.device, torch.float32)
        self._vector_slots[self._length : end] = slots.to(self.device)
        n_known = self._slot_span_ids.numel()  # copy only the slots this add created
        fresh = self._slots.slot_span_ids[n_known:].to(self.device, non_blocking=True)
        self._slot_span_ids = torch.cat([self._slot_span_ids, fresh])
        self._length = end

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        queries_here = queries.to(self.device, torch.float32)
        vectors = self._vectors[:, : self._length]  # (nheads_kv, n_vectors, dim)
        scores = torch.matmul(queries_here, vectors.transpose(1, 2))  # (nheads_kv, n_queries, n_vectors)
        top_scores, top_ids = best_spans(scores, self._vector_slots[: self._length], self._slot_span_ids, k)
        return top_scores.to(queries.device), top_ids.to(queries.device)

    def _raw_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self._vectors[:, : self._length].cpu()
        slots = self._vector_slots[: self._length].cpu()
        return vectors, self._slots.slot_span_ids[slots]

    def _reserve(self, needed: int) -> None:
        capacity = self._vectors.shape[1]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 256)
        vectors = self._vectors.new_empty(self.nheads_kv, capacity, self.dim)
        vector_slots = self._vector_slots.new_empty(capacity)
        vectors[:, : self._length] = self._vectors[:, : self._length]
        vector_slots[: self._length] = self._vector_slots[: self._length]
        self._vectors, self._vector_slots = vectors, vector_slots
