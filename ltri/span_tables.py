"""One layer's stored spans as device tables: each span's length and first stored row, each row's span.

Stored rows are the tokens after the sinks, in text order (row = text position - n_sink): spans leave the
window in order, so span s covers rows [first_rows[s], first_rows[s] + lengths[s]). The tables have a
capacity and are extended in place, so a captured decode step keeps reading the same tensors; the last
span slot is the *empty span*, length 0, which padding stands for:

    lengths     (span_capacity + 1,) int64   0 past the spans stored so far
    first_rows  (span_capacity + 1,) int64
    owner       (row_capacity,) int64        span of each stored row; span_capacity (the empty span) past them

Capacities grow by a quarter; growing makes new tensors.
"""

from __future__ import annotations

import torch

from ltri.growth import grown_capacity
from ltri.repeat import repeat_by_counts


class SpanTables:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.n_spans = 0
        self.n_rows = 0
        self.shortest = 0  # the shortest stored span's length (0 before any)
        self.lengths = torch.zeros(1, dtype=torch.long, device=self.device)
        self.first_rows = torch.zeros(1, dtype=torch.long, device=self.device)
        self.owner = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def span_capacity(self) -> int:
        return self.lengths.numel() - 1

    def spans_fitting(self, budget: int) -> int:
        """The most stored spans that budget tokens can hold."""
        return budget // self.shortest if self.shortest else budget

    def extend(self, lengths: torch.Tensor) -> None:
        """Spans that follow the stored ones: lengths (n,) int64 on the CPU, each at least 1."""
        n, n_rows = lengths.numel(), int(lengths.sum())
        if n:
            shortest = int(lengths.min())
            self.shortest = min(self.shortest, shortest) if self.shortest else shortest
        self.reserve(self.n_spans + n, self.n_rows + n_rows)
        first_rows = self.n_rows + torch.cumsum(lengths, 0) - lengths
        owner = repeat_by_counts(torch.arange(self.n_spans, self.n_spans + n), lengths, n_rows)
        packed = torch.cat([lengths, first_rows, owner])  # one copy to the device for the three
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        lengths, first_rows, owner = packed.to(self.device, non_blocking=True).split([n, n, n_rows])
        spans = slice(self.n_spans, self.n_spans + n)
        self.lengths[spans] = lengths
        self.first_rows[spans] = first_rows
        self.owner[self.n_rows : self.n_rows + n_rows] = owner
        self.n_spans += n
        self.n_rows += n_rows

    def room(self) -> tuple[int, int]:
        """Spans and rows that fit before the tables grow."""
        return self.span_capacity - self.n_spans, self.owner.numel() - self.n_rows

    def reserve(self, n_spans: int, n_rows: int) -> None:
        """Room for n_spans spans and n_rows rows (new tensors only when they grow)."""
        span_capacity, row_capacity = self.span_capacity, self.owner.numel()
        if n_spans <= span_capacity and n_rows <= row_capacity:
            return
        if n_spans > span_capacity:
            span_capacity = grown_capacity(span_capacity, n_spans, minimum=256)
        if n_rows > row_capacity:
            row_capacity = grown_capacity(row_capacity, n_rows, minimum=4096)
        lengths = torch.zeros(span_capacity + 1, dtype=torch.long, device=self.device)
        first_rows = torch.zeros_like(lengths)
        owner = torch.full((row_capacity,), span_capacity, dtype=torch.long, device=self.device)
        lengths[: self.n_spans] = self.lengths[: self.n_spans]
        first_rows[: self.n_spans] = self.first_rows[: self.n_spans]
        owner[: self.n_rows] = self.owner[: self.n_rows]
        self.lengths, self.first_rows, self.owner = lengths, first_rows, owner
