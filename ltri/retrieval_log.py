"""Which stored text an answer attended to: the evidence behind it, for people to check.

Each layer cuts the text into its own spans, so one sentence reaches attention through many slightly
different spans. The log counts, for every token of the text, the (layer, step) pairs that retrieved
a span holding it (its coverage), then reports the best covered spans that do not overlap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievedSpan:
    start: int  # position in the token stream (text, questions and answers) of its first token
    length: int  # tokens
    coverage: float  # (layer, step) pairs that retrieved each of its tokens, on average
    text: str


class RetrievalLog:
    """Counts, over the steps of one answer, the spans each layer memory retrieved."""

    def __init__(self) -> None:
        self._hits: Counter[tuple[int, int]] = Counter()

    def clear(self) -> None:
        self._hits.clear()

    def record(self, memories: Iterable) -> None:
        """Count the spans each memory attended to at the step that just ran (``last_retrieved``)."""
        for memory in memories:
            span_ids = getattr(memory, "last_retrieved", None)
            if span_ids is None or span_ids.numel() == 0:
                continue
            starts = memory.span_starts[span_ids].tolist()
            lengths = memory.span_lengths[span_ids].tolist()
            self._hits.update(zip(starts, lengths, strict=True))

    def coverage(self, n_positions: int | None = None) -> np.ndarray:
        """(n_positions,) float64: for each text position, the (layer, step) pairs that retrieved a span holding
        it; n_positions defaults to the end of the last span counted (later spans are cut off)."""
        if n_positions is None:
            n_positions = max((start + length for start, length in self._hits), default=0)
        coverage = np.zeros(n_positions, dtype=np.float64)
        for (start, length), hits in self._hits.items():
            coverage[start : start + length] += hits
        return coverage

    def top(self, limit: int, text_of: Callable[[int, int], str]) -> list[RetrievedSpan]:
        """Up to limit spans that do not overlap, best covered first (earlier text first among equals)."""
        if not self._hits:
            return []
        coverage = self.coverage()
        means = {span: float(coverage[span[0] : span[0] + span[1]].mean()) for span in self._hits}
        taken = np.zeros(coverage.size, dtype=bool)
        chosen = []
        for start, length in sorted(means, key=lambda span: (-means[span], span)):
            if len(chosen) == limit:
                break
            if not taken[start : start + length].any():
                taken[start : start + length] = True
                chosen.append(RetrievedSpan(start, length, means[start, length], text_of(start, length)))
        return chosen
