"""Quest's span bound as inner-product index vectors (DESIGN.md, The method, point 3).

With element-wise kmax and kmin over a span's keys, sum_i max(q_i * kmax_i, q_i * kmin_i) never falls
below q . k for any key k of the span, and it equals [relu(q), min(q, 0)] . [kmax, kmin]: so the
vectors quest_bound_vectors makes, searched with quest_query(q), fit an inner-product index unchanged.
"""

from __future__ import annotations

import torch


def quest_bound_vectors(keys: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """[kmax, kmin] per span: keys (nheads_kv, seqlen, headdim), spans [starts, ends) (n_spans,) int64
    -> (nheads_kv, n_spans, 2 * headdim) in the keys' dtype."""
    lengths = ends - starts
    if lengths.numel() and int(lengths.min()) < 1:
        raise ValueError("every span needs at least one key")
    nheads_kv, _, headdim = keys.shape
    n_spans = lengths.numel()
    span_of_token = torch.repeat_interleave(torch.arange(n_spans, device=keys.device), lengths)  # (n_tokens,)
    offsets = torch.cumsum(lengths, 0) - lengths
    tokens = torch.arange(span_of_token.numel(), device=keys.device) - offsets[span_of_token] + starts[span_of_token]
    span_keys = keys[:, tokens]  # (nheads_kv, n_tokens, headdim)
    index = span_of_token.view(1, -1, 1).expand_as(span_keys)
    kmax = keys.new_full((nheads_kv, n_spans, headdim), float("-inf")).scatter_reduce_(1, index, span_keys, "amax")
    kmin = keys.new_full((nheads_kv, n_spans, headdim), float("inf")).scatter_reduce_(1, index, span_keys, "amin")
    return torch.cat([kmax, kmin], dim=2)


def quest_query(queries: torch.Tensor) -> torch.Tensor:
    """[relu(q), min(q, 0)]: queries (..., headdim) -> (..., 2 * headdim)."""
    return torch.cat([queries.clamp(min=0), queries.clamp(max=0)], dim=-1)
