"""Choosing which stored spans a chunk or a decode step attends to: head votes, a token budget, persistence.

Every query head asks its KV head's index for its best spans; each head's scores become a softmax
over the spans it found (an estimate of where its attention mass goes), and the heads' weights are
averaged into one vote per span of the layer. Spans picked in recent steps get a bonus. The best
spans are taken until the token budget is spent, then put back in document order.

Vocabulary: nheads, nheads_kv, group = nheads // nheads_kv, k = spans asked per query head.
"""

from __future__ import annotations

import torch


def retrieval_queries(queries: torch.Tensor, nheads_kv: int) -> torch.Tensor:
    """One query per head for a chunk: the mean of its queries.

    queries (1, nheads, q_len, headdim) pre-RoPE -> (nheads_kv, group, headdim) float32.
    """
    _, nheads, _, headdim = queries.shape
    return queries[0].float().mean(dim=1).view(nheads_kv, nheads // nheads_kv, headdim)


def pool_votes(scores: torch.Tensor, span_ids: torch.Tensor, n_spans: int, scale: float) -> torch.Tensor:
    """Average over all query heads of each head's softmax over the spans it found.

    scores, span_ids: (nheads_kv, group, k), ids -1 where a head found fewer than k spans.
    Returns votes (n_spans,) float32; spans no head found get -inf (so that a vote of 0 after
    underflow still counts as found).
    """
    found = span_ids >= 0
    weights = torch.where(found, scores.float() * scale, float("-inf")).softmax(dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a head that found nothing
    n_heads = scores.shape[0] * scores.shape[1]
    votes = torch.zeros(n_spans, dtype=torch.float32, device=scores.device)
    votes.index_add_(0, span_ids[found], weights[found] / n_heads)
    seen = torch.zeros(n_spans, dtype=torch.bool, device=scores.device)
    seen[span_ids[found]] = True
    return votes.masked_fill(~seen, float("-inf"))


def choose_spans(votes: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """Span ids by decreasing vote while their lengths fit the budget, returned in ascending order.

    votes (n_spans,) with -inf for spans not found; lengths (n_spans,) int64 on the same device.
    """
    order = torch.argsort(votes, descending=True, stable=True)
    order = order[torch.isfinite(votes[order])]
    fits = torch.cumsum(lengths[order], dim=0) <= budget
    return torch.sort(order[fits]).values


class Persistence:
    """Remembers when each span was last picked, so that recent picks get a vote bonus."""

    def __init__(self, bonus: float, steps: int) -> None:
        self.bonus = bonus
        self.steps = steps
        self.step = 0
        self.last_picked = torch.empty(0, dtype=torch.long)  # (n_spans,) step of the last pick, -inf-like if never

    def apply(self, votes: torch.Tensor) -> torch.Tensor:
        """Votes with the bonus added to spans picked in the last ``steps`` steps (found or not)."""
        self._grow(votes.numel(), votes.device)
        if self.bonus == 0 or self.steps == 0:
            return votes
        recent = self.last_picked >= self.step - self.steps
        return torch.where(recent, torch.where(torch.isfinite(votes), votes, 0.0) + self.bonus, votes)

    def record(self, picked: torch.Tensor) -> None:
        """picked (n_picked,) span ids chosen at this step; advances the step."""
        self.step += 1
        self.last_picked[picked] = self.step

    def _grow(self, n_spans: int, device) -> None:
        if self.last_picked.device != torch.device(device):
            self.last_picked = self.last_picked.to(device)
        missing = n_spans - self.last_picked.numel()
        if missing > 0:
            never = torch.full((missing,), -(2**62), dtype=torch.long, device=device)
            self.last_picked = torch.cat([self.last_picked, never])

    def state(self) -> dict:
        return {"step": self.step, "last_picked": self.last_picked.cpu()}

    def load_state(self, state: dict, device) -> None:
        self.step = int(state["step"])
        self.last_picked = state["last_picked"].to(device)
