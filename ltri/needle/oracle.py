"""Oracle retrieval, a diagnostic: every retrieval of the ltri policy takes the spans that hold the needle first.

It separates the two ways a needle cell fails (issue 6): retrieval that misses the needle, and a model that
misreads the needle it was given. With the oracle, each layer's needle spans win every retrieval (their votes
are raised to the largest float before the budget is filled), so the needle is resident wherever the budget
holds it; what the model then answers is the ceiling that better retrieval could reach with this model,
budget and position mode. Nothing else changes: the other spans are chosen by their votes as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ltri.retrieval import Persistence
from ltri.span_memory import SpanMemory


class NeedleFirst:
    """Stands in for a memory's Persistence during one retrieval: its votes, with the needle's spans on top."""

    def __init__(self, inner: Persistence, memory: SpanMemory, start: int, end: int) -> None:
        self.inner, self.memory, self.start, self.end = inner, memory, start, end

    def apply(self, votes: torch.Tensor) -> torch.Tensor:
        """votes (n_spans,) -> the same, with every span overlapping the needle [start, end) at the float max."""
        votes = self.inner.apply(votes)
        starts = self.memory.span_starts.to(votes.device)
        ends = starts + self.memory.span_lengths.to(votes.device)
        holds_needle = (starts < self.end) & (ends > self.start)
        return torch.where(holds_needle, torch.finfo(votes.dtype).max, votes)

    def record(self, votes: torch.Tensor) -> None:
        self.inner.record(votes)


@contextmanager
def needle_first(start: int, end: int) -> Iterator[None]:
    """While inside, every SpanMemory retrieval puts the spans holding fed tokens [start, end) first."""
    original = SpanMemory._retrieve

    def retrieve_needle_first(memory, queries):
        persistence = memory.persistence
        memory.persistence = NeedleFirst(persistence, memory, start, end)
        try:
            return original(memory, queries)
        finally:
            memory.persistence = persistence

    SpanMemory._retrieve = retrieve_needle_first
    SpanMemory.retrieval_overridden = True  # decode steps then retrieve eagerly, through the override
    try:
        yield
    finally:
        SpanMemory._retrieve = original
        SpanMemory.retrieval_overridden = False
