"""Exact span search with torch: one batched matmul over all vectors, span max, top-k, on any device."""

from __future__ import annotations

import torch

from ltri.growth import grown_capacity
from ltri.index.base import SpanIndex, SpanSlots, best_spans
from ltri.kernels.vector_scores import vector_scores


class TorchSpanIndex(SpanIndex):
    """Vectors live in a buffer on the layer's device whose capacity grows by a quarter when full.

    dtype: how the vectors are kept. Index vectors are keys, or key bounds and means rounded to the model's
    dtype, so a bf16 model's vectors lose nothing in bf16, at half the memory and search traffic of float32;
    scores are still accumulated and returned in float32 (on CUDA; elsewhere the search computes in float32).
    """

    def __init__(
        self, nheads_kv: int, dim: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> None:
        self.nheads_kv = nheads_kv
        self.dim = dim
        self.device = torch.device(device)
        self._slots = SpanSlots()
        self._vectors = torch.empty(nheads_kv, 0, dim, device=self.device, dtype=dtype)  # (nheads_kv, capacity, dim)
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
        self._vectors[:, self._length : end] = vectors.to(self.device, self._vectors.dtype)
        self._vector_slots[self._length : end] = slots.to(self.device)
        n_known = self._slot_span_ids.numel()  # copy only the slots this add created
        fresh = self._slots.slot_span_ids[n_known:].to(self.device, non_blocking=True)
        self._slot_span_ids = torch.cat([self._slot_span_ids, fresh])
        self._length = end

    def vector_nbytes(self) -> int:
        return self._length * self.nheads_kv * self.dim * self._vectors.element_size()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        vectors = self._vectors[:, : self._length]  # (nheads_kv, n_vectors, dim)
        scores = float32_scores(queries.to(self.device), vectors)  # (nheads_kv, n_queries, n_vectors)
        top_scores, top_ids = best_spans(scores, self._vector_slots[: self._length], self._slot_span_ids, k)
        return top_scores.to(queries.device), top_ids.to(queries.device)

    def search_captured(
        self, queries: torch.Tensor, k: int, n_vectors: torch.Tensor, n_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """search without a host read, for a captured decode step: every buffer slot is scored and the vectors
        past n_vectors (0-dim int64 on the device, the count when the step runs) are left out.

        Results name slots, not span ids (the same for a memory that adds spans 0, 1, 2, ... in order).
        n_slots: above every slot in use; slot n_slots - 1 is never any span's (the left-out vectors go
        there, each with score -inf). Returns scores, slots (nheads_kv, n_queries, min(k, n_slots)), slot -1
        where a query found fewer spans. The shapes and the tensors read stay the same until the buffer grows.
        """
        capacity = self._vectors.shape[1]
        valid = torch.arange(capacity, device=self.device) < n_vectors
        scores = float32_scores(queries.to(self.device), self._vectors).masked_fill(~valid, float("-inf"))
        slots = torch.where(valid, self._vector_slots, n_slots - 1)
        identity = torch.arange(n_slots, device=self.device)
        return best_spans(scores, slots, identity, k)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors search_captured reads (a captured step stays valid while these are the same)."""
        return self._vectors, self._vector_slots

    def slots_are_span_ids(self) -> bool:
        """Whether spans were added as 0, 1, 2, ... (then a slot is its span's id)."""
        ids = self._slots.slot_span_ids
        return bool(torch.equal(ids, torch.arange(ids.numel())))

    def _raw_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self._vectors[:, : self._length].to("cpu", torch.float32)
        slots = self._vector_slots[: self._length].cpu()
        return vectors, self._slots.slot_span_ids[slots]

    def _reserve(self, needed: int) -> None:
        capacity = self._vectors.shape[1]
        if needed <= capacity:
            return
        # Grow by a quarter (doubling left up to half of the index unused: GBs at 512K tokens).
        capacity = grown_capacity(capacity, needed, minimum=256)
        vectors = self._vectors.new_empty(self.nheads_kv, capacity, self.dim)
        vector_slots = self._vector_slots.new_empty(capacity)
        vectors[:, : self._length] = self._vectors[:, : self._length]
        vector_slots[: self._length] = self._vector_slots[: self._length]
        self._vectors, self._vector_slots = vectors, vector_slots


def float32_scores(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """queries (h, n_queries, dim) @ vectors (h, n_vectors, dim)^T in float32, with vectors kept in any dtype.

    On CUDA the vector scores kernel (the queries rounded to the vectors' dtype: decode and question queries
    are the model's own, already in it; float32 accumulation); elsewhere a float32 matmul."""
    if vectors.is_cuda:
        return vector_scores(queries, vectors)
    return torch.matmul(queries.float(), vectors.float().transpose(1, 2))
