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

from ltri.span_memory import SpanMemory


def needle_on_top(memory: SpanMemory, votes: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """votes (n_spans,) -> the same, with every span overlapping the needle [start, end) at the float max."""
    starts = memory.span_starts.to(votes.device)
    ends = starts + memory.span_lengths.to(votes.device)
    holds_needle = (starts < end) & (ends > start)
    return torch.where(holds_needle, torch.finfo(votes.dtype).max, votes)


@contextmanager
def needle_first(start: int, end: int) -> Iterator[None]:
    """While inside, every SpanMemory retrieval puts the spans holding fed tokens [start, end) first (their votes
    raised after persistence has remembered the votes as they were)."""
    original_votes = SpanMemory.votes

    def votes_needle_first(memory, *args, **kwargs):
        return needle_on_top(memory, original_votes(memory, *args, **kwargs), start, end)

    SpanMemory.votes = votes_needle_first
    SpanMemory.retrieval_overridden = True  # decode steps then retrieve eagerly, through the override
    try:
        yield
    finally:
        SpanMemory.votes = original_votes
        SpanMemory.retrieval_overridden = False
