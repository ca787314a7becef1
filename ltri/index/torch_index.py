"""Exact span search with torch on any device: each span's best vector score per query, then top-k.

SpanMemory adds each span's vectors together, spans in order: the index then keeps, per span slot, its first
vector and its count, and scores spans in one pass (``kernels/span_scores.py``). Vectors added otherwise (a
span given more vectors later, spans out of order) switch the index for good to scoring every vector and a
scatter maximum per span (``base.best_spans``), the same results."""

from __future__ import annotations

import torch

from ltri.growth import grown_capacity, with_room
from ltri.index.base import SpanIndex, SpanSlots, best_spans, pad_results, top_spans
from ltri.kernels.span_scores import MAX_VECTORS, per_span_rows, span_scores
from ltri.kernels.vector_scores import vector_scores
from ltri.topk import first_k_found, padded_width


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
        self._grouped = True  # every span's vectors consecutive: the slot tables below describe them
        self._slot_first = torch.zeros(0, dtype=torch.long, device=self.device)  # (slot capacity,) first vector
        self._slot_count = torch.zeros(0, dtype=torch.long, device=self.device)  # (slot capacity,) 0 past the spans
        self._max_vectors = 0  # the most vectors of one span
        self._n_valid = torch.zeros((), dtype=torch.long, device=self.device)  # _length on the device, for search

    @property
    def n_spans(self) -> int:
        return self._slots.n_spans

    @property
    def n_vectors(self) -> int:
        return self._length

    def add(self, vectors: torch.Tensor, span_ids: torch.Tensor) -> None:
        self._check_add(vectors, span_ids)
        n_new = vectors.shape[1]
        n_before = self.n_spans
        slots = self._slots.assign(span_ids)
        self._reserve(self._length + n_new)
        self._describe_slots(slots, n_before)
        end = self._length + n_new
        self._vectors[:, self._length : end] = vectors.to(self.device, self._vectors.dtype)
        self._vector_slots[self._length : end] = slots.to(self.device, non_blocking=True)  # staged: no stream sync
        n_known = self._slot_span_ids.numel()  # copy only the slots this add created
        fresh = self._slots.slot_span_ids[n_known:].to(self.device, non_blocking=True)
        self._slot_span_ids = torch.cat([self._slot_span_ids, fresh])
        self._length = end
        self._n_valid.fill_(end)  # a kernel, not a host-to-device copy (which would wait for the stream)

    def vector_nbytes(self) -> int:
        return self._length * self.nheads_kv * self.dim * self._vectors.element_size()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_search(queries, k)
        queries_here = queries.to(self.device)
        if self._grouped:
            scores = self._span_scores(queries_here, self._n_valid, padded_width(self.n_spans))  # -inf past the spans
            top_scores, top_ids = top_spans(scores, self._slot_span_ids, k)
        else:
            vectors = self._vectors[:, : self._length]  # (nheads_kv, n_vectors, dim)
            scores = float32_scores(queries_here, vectors)  # (nheads_kv, n_queries, n_vectors)
            top_scores, top_ids = best_spans(scores, self._vector_slots[: self._length], self._slot_span_ids, k)
        return top_scores.to(queries.device), top_ids.to(queries.device)

    def search_captured(
        self, queries: torch.Tensor, k: int, n_vectors: torch.Tensor, n_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """search without a host read, for a captured decode step (``captured_search_ready``): every slot below
        n_slots is scored, from the slot tables as they are when the step runs; vectors past n_vectors (0-dim
        int64 on the device) are left out, and slots without vectors score -inf.

        Results name slots, not span ids (the same for a memory that adds spans 0, 1, 2, ... in order), and are the
        ones search finds (ties to the earlier slot) but not sorted by score: the votes pooled from them do not
        depend on their order (``kernels.settled_votes``), and a sort with its gathers took about 20 us a layer of a
        128K decode step on the H100 (NOTES.md step 40).
        Returns scores, slots (nheads_kv, n_queries, min(k, n_slots)), slot -1 where a query found fewer spans.
        The shapes and the tensors read stay the same while ``buffers`` and ``per_span_rows`` do.
        """
        scores = self._span_scores(queries.to(self.device), n_vectors, padded_width(n_slots))  # -inf past n_slots
        top_scores, top_slots = first_k_found(scores, k)  # a slot is its span's id (captured_search_ready)
        return pad_results(top_scores, top_slots, k)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors search_captured reads (a captured step stays valid while these are the same)."""
        return self._vectors, self._slot_first, self._slot_count

    @property
    def per_span_rows(self) -> int:
        """Vectors read per span slot by a search (a captured step stays valid while this is the same)."""
        return per_span_rows(self._max_vectors)

    def captured_search_ready(self) -> bool:
        """Whether search_captured applies: spans added as 0, 1, 2, ... (a slot is its span's id), each with its
        vectors together."""
        ids = self._slots.slot_span_ids
        return self._grouped and bool(torch.equal(ids, torch.arange(ids.numel())))

    def _span_scores(self, queries: torch.Tensor, n_valid: torch.Tensor, n_slots: int) -> torch.Tensor:
        """(nheads_kv, n_queries, n_slots) float32: each slot's best vector score, -inf without vectors."""
        return span_scores(
            queries, self._vectors, self._slot_first, self._slot_count, n_valid, n_slots, self._max_vectors
        )

    def _describe_slots(self, slots: torch.Tensor, n_before: int) -> None:
        """Record where the vectors just added (slots (n_new,), CPU) lie, while every span's lie together: new
        spans only (slots from n_before on), in ascending order, none with more than MAX_VECTORS. Else the index
        stops using the slot tables for good."""
        if not self._grouped or slots.numel() == 0:
            return
        counts = _counts_of_new_spans(slots, n_before, self.n_spans)
        if counts is None:
            self._grouped = False
            return
        firsts = self._length + torch.cumsum(counts, 0) - counts
        self._slot_first = with_room(self._slot_first, self.n_spans, self.device)
        self._slot_count = with_room(self._slot_count, self.n_spans, self.device)
        self._slot_first[n_before : self.n_spans] = firsts.to(self.device, non_blocking=True)
        self._slot_count[n_before : self.n_spans] = counts.to(self.device, non_blocking=True)
        self._max_vectors = max(self._max_vectors, int(counts.max()))

    def room(self) -> tuple[int, int]:
        """Span slots and vectors that fit before the index's buffers grow."""
        return self._slot_first.numel() - self.n_spans, self._vectors.shape[1] - self._length

    def reserve(self, n_spans: int, n_vectors: int) -> None:
        """Room for n_spans span slots and n_vectors vectors (new buffers only when they grow)."""
        self._reserve(n_vectors)
        self._slot_first = with_room(self._slot_first, n_spans, self.device)
        self._slot_count = with_room(self._slot_count, n_spans, self.device)

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


def _counts_of_new_spans(slots: torch.Tensor, n_before: int, n_spans: int) -> torch.Tensor | None:
    """Vectors per new slot (n_spans - n_before,) when slots (n_new,) add vectors to new slots only, in ascending
    order, at most MAX_VECTORS each; else None."""
    if int(slots.min()) < n_before or bool((slots[1:] < slots[:-1]).any()):
        return None
    counts = torch.bincount(slots - n_before, minlength=n_spans - n_before)
    return counts if int(counts.max()) <= MAX_VECTORS else None
