"""The span index interface, and the pieces every backend shares.

A span index holds, per KV head of one layer, a few index vectors per span and answers: which k spans
score highest for this query? A span's score is the largest inner product between the query and any
of its vectors. Shapes: vectors (nheads_kv, n_vectors, dim), queries (nheads_kv, n_queries, dim),
results (nheads_kv, n_queries, k).

Span ids are arbitrary int64 >= 0. Inside an index they map to dense *slots* 0..n_spans-1 (SpanSlots),
so that "max over a span's vectors" is one scatter_reduce into an (nheads_kv, n_queries, n_spans) tensor.

state() is the same for every backend: the raw float32 vectors and their span ids, in the order they
were added. It does not depend on the FAISS version or on where the index lived, and from_state can
rebuild any backend from any backend's state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ltri.errors import LtriError
from ltri.topk import topk_ties_to_first

STATE_KEYS = ("vectors", "span_ids")


class SpanSlots:
    """Maps span ids to dense slots 0..n_spans-1 and counts vectors per slot (CPU tensors).

    Slots are numbered in the order spans are first added (within one add, by ascending span id).
    Lookups are vectorised: a sorted copy of the ids and searchsorted, no per-span Python loop.
    """

    def __init__(self) -> None:
        self._sorted_ids = torch.empty(0, dtype=torch.long)  # (n_spans,) span ids, ascending
        self._sorted_slots = torch.empty(0, dtype=torch.long)  # (n_spans,) slot of each sorted id
        self.slot_span_ids = torch.empty(0, dtype=torch.long)  # (n_spans,) span id of each slot
        self.slot_counts = torch.empty(0, dtype=torch.long)  # (n_spans,) vectors per slot

    @property
    def n_spans(self) -> int:
        return self.slot_span_ids.numel()

    def max_vectors_per_span(self) -> int:
        return int(self.slot_counts.max()) if self.n_spans else 0

    def assign(self, span_ids: torch.Tensor) -> torch.Tensor:
        """Slots (n_vectors,) for span_ids (n_vectors,), creating slots for spans not seen before."""
        span_ids = span_ids.to("cpu", torch.long)
        unique_ids, inverse = torch.unique(span_ids, return_inverse=True)
        unique_slots, known = self._lookup(unique_ids)
        new_ids = unique_ids[~known]
        new_slots = torch.arange(self.n_spans, self.n_spans + new_ids.numel())
        unique_slots[~known] = new_slots
        self._insert(new_ids, new_slots)
        slots = unique_slots[inverse]
        self.slot_counts += torch.bincount(slots, minlength=self.n_spans)
        return slots

    def _lookup(self, unique_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, known) for ascending unique_ids; slots of unknown ids are -1."""
        if self.n_spans == 0:
            return torch.full_like(unique_ids, -1), torch.zeros_like(unique_ids, dtype=torch.bool)
        positions = torch.searchsorted(self._sorted_ids, unique_ids).clamp(max=self.n_spans - 1)
        known = self._sorted_ids[positions] == unique_ids
        return torch.where(known, self._sorted_slots[positions], -1), known

    def _insert(self, new_ids: torch.Tensor, new_slots: torch.Tensor) -> None:
        ids = torch.cat([self._sorted_ids, new_ids])
        slots = torch.cat([self._sorted_slots, new_slots])
        if self.n_spans and new_ids.numel() and new_ids[0] <= self._sorted_ids[-1]:
            order = torch.argsort(ids)  # ids out of order; spans leaving a window come in ascending order
            ids, slots = ids[order], slots[order]
        self._sorted_ids, self._sorted_slots = ids, slots
        self.slot_span_ids = torch.cat([self.slot_span_ids, new_ids])
        self.slot_counts = torch.cat([self.slot_counts, torch.zeros_like(new_ids)])


def best_spans(
    scores: torch.Tensor, slots: torch.Tensor, slot_span_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best distinct spans per head and query, from scores of (candidate) vectors.

    scores: (nheads_kv, n_queries, n_candidates) float32, one per candidate vector;
    slots: the candidates' span slots (>= 0), (n_candidates,) or (nheads_kv, n_queries, n_candidates);
    slot_span_ids: (n_spans,) span id of each slot, on the scores' device.
    A place without a candidate is given score -inf (and any valid slot): it never makes a span appear.
    Returns scores (nheads_kv, n_queries, k) float32 descending, span_ids (nheads_kv, n_queries, k) int64;
    a span's score is the max over its candidates; places without a span hold id -1 and score -inf.
    """
    nheads_kv, n_queries, n_candidates = scores.shape
    n_spans = slot_span_ids.numel()
    slots = slots.expand(nheads_kv, n_queries, n_candidates)
    span_scores = scores.new_full((nheads_kv, n_queries, n_spans), float("-inf"))
    span_scores.scatter_reduce_(2, slots, scores, reduce="amax", include_self=True)
    return top_spans(span_scores, slot_span_ids, k)


def top_spans(span_scores: torch.Tensor, slot_span_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best spans per head and query from their scores (nheads_kv, n_queries, n_slots) float32, -inf for
    slots without a span; slot_span_ids (at least each slot with a span,) the span id of each slot. Returns as
    best_spans does; of spans with equal scores the earlier slot comes first (whatever the width of the table)."""
    top_scores, top_slots = topk_ties_to_first(span_scores, k)  # (nheads_kv, n_queries, <=k)
    top_slots = top_slots.clamp(max=slot_span_ids.numel() - 1)  # slots past the ids score -inf
    top_ids = slot_span_ids[top_slots].masked_fill(top_scores == float("-inf"), -1)
    return pad_results(top_scores, top_ids, k)


def pad_results(scores: torch.Tensor, span_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads (nheads_kv, n_queries, n) results to k places with score -inf and id -1."""
    missing = k - scores.shape[2]
    if missing <= 0:
        return scores, span_ids
    pad_shape = (*scores.shape[:2], missing)
    scores = torch.cat([scores, scores.new_full(pad_shape, float("-inf"))], dim=2)
    span_ids = torch.cat([span_ids, span_ids.new_full(pad_shape, -1)], dim=2)
    return scores, span_ids


class SpanIndex(ABC):
    """One layer's span index, covering all its KV heads. Backends are built as cls(nheads_kv, dim, device, dtype)."""

    nheads_kv: int
    dim: int

    @abstractmethod
    def add(self, vectors: torch.Tensor, span_ids: torch.Tensor) -> None:
        """vectors (nheads_kv, n_vectors, dim); span_ids (n_vectors,) int64 >= 0, may repeat."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (nheads_kv, n_queries, dim) -> scores, span_ids, each (nheads_kv, n_queries, k)."""

    @property
    @abstractmethod
    def n_spans(self) -> int:
        """Distinct spans added."""

    @property
    @abstractmethod
    def n_vectors(self) -> int:
        """Vectors added (per head)."""

    def vector_nbytes(self) -> int:
        """Bytes the vectors take (float32 unless a backend keeps them otherwise)."""
        return self.n_vectors * self.nheads_kv * self.dim * 4

    @abstractmethod
    def _raw_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All vectors (nheads_kv, n_vectors, dim) float32 and their span ids (n_vectors,), CPU, as added."""

    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild this index (CPU tensors): the raw vectors and their span ids."""
        vectors, span_ids = self._raw_vectors()
        return {"vectors": vectors, "span_ids": span_ids}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> SpanIndex:
        vectors, span_ids = check_state(state)
        index = cls(vectors.shape[0], vectors.shape[2], device, dtype)
        if span_ids.numel():
            index.add(vectors, span_ids)
        return index

    def _check_add(self, vectors: torch.Tensor, span_ids: torch.Tensor) -> None:
        if vectors.ndim != 3 or vectors.shape[0] != self.nheads_kv or vectors.shape[2] != self.dim:
            raise ValueError(
                f"vectors must be (nheads_kv={self.nheads_kv}, n_vectors, dim={self.dim}), got {tuple(vectors.shape)}"
            )
        if span_ids.shape != (vectors.shape[1],):
            raise ValueError(f"span_ids must be ({vectors.shape[1]},), got {tuple(span_ids.shape)}")
        if span_ids.dtype.is_floating_point or (span_ids.numel() and int(span_ids.min()) < 0):
            raise ValueError("span_ids must be integers >= 0")

    def _check_search(self, queries: torch.Tensor, k: int) -> None:
        if queries.ndim != 3 or queries.shape[0] != self.nheads_kv or queries.shape[2] != self.dim:
            raise ValueError(
                f"queries must be (nheads_kv={self.nheads_kv}, n_queries, dim={self.dim}), got {tuple(queries.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")


def check_state(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (vectors, span_ids) of a saved index state, or LtriError when it is not a whole one."""
    problem = _state_problem(state)
    if problem:
        raise LtriError(f"The saved span index is damaged ({problem}); ingest the text again.")
    return state["vectors"].to(torch.float32), state["span_ids"].to(torch.long)


def _state_problem(state: dict[str, torch.Tensor]) -> str | None:
    if any(not isinstance(state.get(key), torch.Tensor) for key in STATE_KEYS):
        return f"it needs tensors {', '.join(STATE_KEYS)}"
    vectors, span_ids = state["vectors"], state["span_ids"]
    if vectors.ndim != 3 or span_ids.shape != (vectors.shape[1],):
        return f"vectors {tuple(vectors.shape)} and span ids {tuple(span_ids.shape)} do not match"
    if span_ids.numel() and int(span_ids.min()) < 0:
        return "it holds negative span ids"
    return None
