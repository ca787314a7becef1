"""Evidence: tokens of stored spans that a question's reread encoded anew, resident with the window for its answer.

``ltri.reread`` with ``RetrievalConfig.reread_evidence`` > 0 reads, with the window, the stored tokens the question's
retrieval agreed on most across layers, as one chunk; each layer keeps their new keys and values here, resident
right before the window, where the reread read it, with the spans it retrieves leaving those tokens out, until the
next question or the next text fed.
Shapes: keys, values (1, nheads_kv, n, headdim); positions (n,) text positions, ascending.
"""

from __future__ import annotations

import torch

from ltri.token_buffer import TokenBuffer


class Evidence:
    def __init__(self) -> None:
        self.tokens = TokenBuffer()
        self.generation = 0  # counts replacements: a captured decode step bound to one evidence knows it is stale

    @property
    def length(self) -> int:
        return self.tokens.length

    def clear(self) -> None:
        self.tokens = TokenBuffer()
        self.generation += 1

    def keep(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the evidence with these tokens."""
        self.clear()
        if positions.numel():
            self.tokens.append(keys, values, positions)

    def held_rows(self, n_sink: int, n_rows: int) -> torch.Tensor:
        """Which of n_rows stored rows (row = text position - n_sink, ``ltri.span_tables``) the evidence holds:
        (n_rows,) bool on the evidence's device (a captured decode step leaves them out of what it retrieves)."""
        positions = self.tokens.positions()
        held = torch.zeros(n_rows, dtype=torch.bool, device=positions.device)
        rows = positions - n_sink
        held[rows[(rows >= 0) & (rows < n_rows)]] = True
        return held

    def leave_out(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Retrieved tokens (keys, values, positions) without those the evidence holds (one device read)."""
        if self.length == 0:
            return keys, values, positions
        return without_positions(keys, values, positions, self.tokens.positions())


def rows_not_held(rows: torch.Tensor, count: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieved stored rows (B,) int64 (their first count valid, 0 past them) without those held (Evidence.held_rows),
    in the same form and order, with their count (0-dim int64): fixed shapes, no host sync (a captured step's)."""
    budget = rows.numel()
    kept = (torch.arange(budget, device=rows.device) < count) & ~held[rows]
    places = torch.where(kept, torch.cumsum(kept, 0) - 1, budget)  # dropped rows land in a last, discarded slot
    packed = torch.zeros(budget + 1, dtype=rows.dtype, device=rows.device).scatter_(0, places, rows)
    return packed[:budget], kept.sum()


def without_positions(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, excluded: torch.Tensor):
    """Tokens (keys, values (1, nheads_kv, n, headdim), positions (n,)) but those at the excluded positions."""
    if positions.numel() == 0 or excluded.numel() == 0:
        return keys, values, positions
    kept = ~torch.isin(positions, excluded.to(positions.device))
    return keys[:, :, kept], values[:, :, kept], positions[kept]


def agreed_positions(memories: list, before: int, n_tokens: int) -> torch.Tensor:
    """The n_tokens text positions before ``before`` that most layers' last retrieval holds, ascending (CPU).

    Ties go to the later position (nearer the question)."""
    if n_tokens <= 0:
        return torch.empty(0, dtype=torch.long)
    return most_held_positions(agreed_counts(memories, before), n_tokens)


def agreed_counts(memories: list, before: int) -> torch.Tensor:
    """How many layers' last retrieval holds each text position before ``before`` (before,) int32 (CPU)."""
    # Each retrieved span adds 1 over [start, end): +1 at its start and -1 at its end, summed along the text.
    edges = torch.zeros(before + 1, dtype=torch.int32)
    for memory in memories:
        chosen = memory.last_retrieved.cpu()
        starts = memory.span_starts[chosen].clamp(max=before)
        ends = (memory.span_starts[chosen] + memory.span_lengths[chosen]).clamp(max=before)
        edges.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
        edges.index_add_(0, ends, torch.full_like(ends, -1, dtype=torch.int32))
    return edges.cumsum(0, dtype=torch.int32)[:before]


def most_held_positions(counts, n_tokens: int) -> torch.Tensor:
    """The (at most) n_tokens positions with the highest counts (n_positions,) above 0 (a tensor or an array),
    ascending (CPU).

    Ties go to the later position (nearer the question)."""
    counts = torch.as_tensor(counts).cpu()
    n_positions = counts.numel()
    held = int((counts > 0).sum())
    if n_tokens <= 0 or held == 0:
        return torch.empty(0, dtype=torch.long)
    rank = counts.double() + torch.arange(n_positions, dtype=torch.double) / (n_positions + 1)
    return torch.argsort(rank, descending=True)[: min(n_tokens, held)].sort().values
