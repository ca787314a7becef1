"""Choosing which stored spans a chunk or a decode step attends to: head votes, a token budget, persistence.

Every query head asks its KV head's index for its best spans (with each query of a short chunk, or
the mean query of a long one); each query's scores become a softmax over the spans it found (an
estimate of where its attention mass goes), and these weights are averaged into one vote per span
of the layer. A span's vote fades over a few steps rather than vanishing, and spans get a bonus
from what other layers voted for (``ltri.shared_votes``): retrieval heads are few, so layers that
find little borrow their evidence.
The best spans are taken until the token budget is spent, then put back in document order.

Vocabulary: nheads, nheads_kv, group = nheads // nheads_kv, k = spans asked per query.
"""

from __future__ import annotations

import torch

from ltri.growth import with_room
from ltri.kernels.budget_rows import budget_rows
from ltri.kernels.settled_votes import PersistArgs
from ltri.topk import first_k_places


def retrieval_queries(
    queries: torch.Tensor, nheads_kv: int, max_voting_queries: int, voting_window: int = 0
) -> torch.Tensor:
    """The queries a chunk asks the index with, grouped by KV head.

    queries (1, nheads, q_len, headdim) pre-RoPE -> (nheads_kv, n_ask, headdim) float32: every query
    when q_len <= max_voting_queries (a question, a decode step: each query votes; only the last voting_window
    of them when voting_window > 0), else one mean query per head (a long prefill chunk).
    n_ask = group * (number of voting queries) or group.
    """
    _, nheads, q_len, headdim = queries.shape
    queries = queries[0].float()
    if q_len > max_voting_queries:
        queries = queries.mean(dim=1, keepdim=True)
    elif voting_window:
        queries = queries[:, -voting_window:]
    return queries.reshape(nheads_kv, -1, headdim)


def choose_spans(votes: torch.Tensor, lengths: torch.Tensor, budget: int, max_spans: int | None = None) -> torch.Tensor:
    """Span ids by decreasing vote while their lengths fit the budget, returned in ascending order on the host
    (one wait for the device).

    votes (n_spans,) with -inf for spans not found; lengths (n_spans,) int64 on the same device; max_spans: at
    least the most spans the budget can hold (budget // the shortest length), default budget.
    """
    chosen = chosen_spans_padded(votes, lengths, budget, max_spans).cpu()
    return chosen[chosen < votes.numel()]


def chosen_spans_padded(
    votes: torch.Tensor, lengths: torch.Tensor, budget: int, max_spans: int | None = None
) -> torch.Tensor:
    """choose_spans without a host sync: (m,) the chosen ids ascending, then n_spans as padding, where
    m = min(n_spans, budget, max_spans) (every span holds at least one token, so at most budget spans fit).

    Only the m best votes can be chosen, so a top-m replaces a sort of every span; the candidates are then
    ordered by vote, ties by id (also where they straddle the m-th place)."""
    n_spans = votes.numel()
    m = min(n_spans, budget) if max_spans is None else min(n_spans, budget, max_spans)
    return budget_rows(votes, first_k_places(votes, m), lengths, None, budget, 0)[0]


class Persistence:
    """A span's vote fades over steps instead of vanishing: effective vote = max(vote now, decay * last one).

    So a span that drew much attention stays in for a few steps (evidence is not dropped one token
    later), while spans that only just made the budget do not crowd out new evidence. The remembered
    votes live in one buffer updated in place (a captured decode step reads and writes it), grown by a
    quarter when more spans are asked for; entries past the spans recorded so far are 0.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.buffer = torch.zeros(0)  # (capacity,) effective votes of the last step, 0 if none

    def args(self, n_spans: int, device) -> PersistArgs:
        """What a layer's settled votes (``kernels.settled_votes``) fade with and remember, with room for n_spans."""
        self.reserve(n_spans, device)
        return PersistArgs(self.buffer, self.decay)

    def reserve(self, n_spans: int, device) -> None:
        """Room for n_spans votes on device (a new buffer only when it moves or grows)."""
        self.buffer = with_room(self.buffer, n_spans, device)

    def restore(self, remembered: torch.Tensor) -> None:
        """Bring back votes (n,) remembered earlier (a copy of buffer[:n]), in place; later entries become 0."""
        self.buffer.zero_()
        self.buffer[: remembered.numel()] = remembered

    def state(self) -> dict:
        return {"remembered": self.buffer.cpu()}

    def load_state(self, state: dict, device) -> None:
        self.buffer = state["remembered"].to(device)
