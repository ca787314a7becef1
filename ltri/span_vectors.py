"""Index vectors of spans (DESIGN.md, The method, point 3), per KV head.

Two kinds: a span's most attended keys (1..max_vectors of them, fewer for confident spans), and
Quest's bound, element-wise [kmax, kmin] over the span's keys, which with bound_query(q) gives an
inner product that never falls below q . k for any key k of the span.
Vocabulary: nheads_kv, n tokens in the block, n_spans spans, headdim; total index vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ltri.repeat import repeat_by_counts
from ltri.spans import Segmentation


def span_of_token(segmentation: Segmentation, n: int | None = None) -> Tensor:
    """(n,) int64: the span index of each token of the block (n: the block's tokens, if known: no device sync)."""
    return repeat_by_counts(None, segmentation.lengths, n)


def vectors_per_span(segmentation: Segmentation, max_vectors: int) -> Tensor:
    """(n_spans,) int64 in 1..max_vectors: how many index vectors each span gets.

    Rule: with q_k = S_k / length_k (triangle score per token) and q_nb the larger of the two
    neighbours' q (0 at the block's edges or when negative), a span kept by NMS with q_k > 0 has
    uncertainty u_k = q_nb / (q_k + q_nb): 0 when it stands alone above weak neighbours, 1/2 next to
    an equally strong one, towards 1 next to a stronger one. Spans made by gap filling, or with
    q_k <= 0, have u_k = 1. count_k = 1 + round(u_k * (max_vectors - 1)), never more than the span's
    length. So the count never rises with the span's own score and never falls with its neighbours'.
    """
    if max_vectors < 1:
        raise ValueError(f"max_vectors must be at least 1, got {max_vectors}")
    lengths = segmentation.lengths
    per_token = segmentation.scores.double() / lengths.clamp(min=1)  # (n_spans,)
    positive = per_token.clamp(min=0)
    zero = positive.new_zeros(1)
    neighbours = torch.maximum(torch.cat([zero, positive[:-1]]), torch.cat([positive[1:], zero]))  # (n_spans,)
    confident = segmentation.from_triangles & (per_token > 0)
    uncertainty = torch.where(confident, neighbours / (positive + neighbours).clamp(min=1e-30), 1.0)
    counts = 1 + torch.round(uncertainty * (max_vectors - 1)).long()
    return torch.minimum(counts, lengths.clamp(min=1))


def in_span_attention(attention: Tensor, segmentation: Segmentation) -> Tensor:
    """(nheads_kv, n): attention each token receives from queries of its own span (column sums of A
    over rows in the token's span). attention: (nheads_kv, n, n)."""
    span = span_of_token(segmentation, attention.shape[-1])  # (n,)
    same = span[:, None] == span[None, :]  # (n, n) query i and key j in one span
    return (attention * same).sum(1)


def top_attended_keys(
    keys: Tensor, attention: Tensor, segmentation: Segmentation, counts: Tensor
) -> tuple[Tensor, Tensor]:
    """The counts[s] keys of each span s that its own queries attend to most, per KV head.

    keys: (nheads_kv, n, headdim) pre-RoPE; attention: (nheads_kv, n, n) the block's attention averaged
    over each KV head's query heads; counts: (n_spans,) int64 with 0 <= counts <= span length.
    Returns vectors (nheads_kv, total, headdim), total = counts.sum(), spans in order and each span's
    keys by received attention, most first; and span_of_vector (total,) int64 in 0..n_spans-1.
    One device sync: the few sizes the output needs (and the checks) come to the host together.
    """
    nheads_kv, n, headdim = keys.shape
    lengths, starts = segmentation.lengths, segmentation.starts
    if attention.shape != (nheads_kv, n, n) or counts.shape != lengths.shape:
        raise ValueError(f"keys {tuple(keys.shape)}, attention {tuple(attention.shape)} and counts do not match")
    covered, width, k, total, counts_fit = _top_key_sizes(lengths, counts)
    if covered != n:
        raise ValueError(f"the spans cover {covered} tokens, the keys {n}")
    if not counts_fit:
        raise ValueError("counts must lie in 0..span length")
    received = in_span_attention(attention.float(), segmentation)  # (nheads_kv, n)
    offsets = torch.arange(width, device=keys.device)  # (width,)
    tokens = starts[:, None] + offsets  # (n_spans, width)
    inside = offsets < lengths[:, None]
    padded = received[:, tokens.clamp(max=n - 1)].masked_fill(~inside, float("-inf"))  # (nheads_kv, n_spans, width)
    best = torch.topk(padded, k, dim=2).indices  # (nheads_kv, n_spans, k) offsets, most attended first
    span_of_vector = repeat_by_counts(None, counts, total)  # (total,) counts are on the keys' device
    rank = torch.arange(total, device=keys.device) - (counts.cumsum(0) - counts)[span_of_vector]  # within its span
    picked = starts[span_of_vector] + best[:, span_of_vector, rank]  # (nheads_kv, total) token indices
    vectors = keys.gather(1, picked[..., None].expand(-1, -1, headdim))
    return vectors, span_of_vector


def _top_key_sizes(lengths: Tensor, counts: Tensor) -> tuple[int, int, int, int, bool]:
    """Host integers for top_attended_keys, in one transfer: tokens covered, the widest span (>= 1),
    the most vectors of a span (>= 1), the total of vectors, and whether 0 <= counts <= lengths."""
    if lengths.numel() == 0:
        return 0, 1, 1, 0, True
    fit = ((counts >= 0) & (counts <= lengths)).all()
    sizes = torch.stack([lengths.sum(), lengths.max(), counts.max(), counts.sum(), fit.long()]).tolist()
    covered, width, k, total, counts_fit = sizes
    return covered, max(width, 1), max(k, 1), total, bool(counts_fit)


def key_bounds(keys: Tensor, segmentation: Segmentation) -> Tensor:
    """Quest's bound per span: keys (nheads_kv, n, headdim) -> (nheads_kv, n_spans, 2 * headdim),
    [kmax, kmin] element-wise over each span's keys, in the keys' dtype."""
    nheads_kv, n, headdim = keys.shape
    if int(segmentation.lengths.sum()) != n:
        raise ValueError(f"the spans cover {int(segmentation.lengths.sum())} tokens, the keys {n}")
    index = span_of_token(segmentation, n)[None, :, None].expand_as(keys)  # (nheads_kv, n, headdim)
    shape = (nheads_kv, segmentation.n_spans, headdim)
    kmax = keys.new_zeros(shape).scatter_reduce_(1, index, keys, "amax", include_self=False)
    kmin = keys.new_zeros(shape).scatter_reduce_(1, index, keys, "amin", include_self=False)
    return torch.cat([kmax, kmin], dim=2)


def bound_query(q: Tensor) -> Tensor:
    """[relu(q), min(q, 0)]: q (..., headdim) -> (..., 2 * headdim). Its inner product with a span's
    [kmax, kmin] is sum_d max(q_d * kmax_d, q_d * kmin_d) >= max_j q . k_j over the span's keys, with
    equality when the span has one key."""
    return torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)
