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

    @property
    def length(self) -> int:
        return self.tokens.length

    def clear(self) -> None:
        self.tokens = TokenBuffer()

    def keep(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace the evidence with these tokens."""
        self.clear()
        if positions.numel():
            self.tokens.append(keys, values, positions)

    def leave_out(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Retrieved tokens (keys, values, positions) without those the evidence holds (one device read)."""
        if self.length == 0:
            return keys, values, positions
        return without_positions(keys, values, positions, self.tokens.positions())


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
