"""Index vectors of spans (DESIGN.md, The method, point 3), per KV head.

Two kinds: a span's most attended keys (1..max_vectors of them, fewer for confident spans), and
Quest's bound, element-wise [kmax, kmin] over the span's keys, which with bound_query(q) gives an
inner product that never falls below q . k for any key k of the span.
Vocabulary: nheads_kv, n tokens in the block, n_spans spans, headdim; total index vectors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ltri.repeat import repeat_by_counts
from ltri.spans import Segmentation


def span_of_token(segmentation: Segmentation, n: int | None = None) -> Tensor:
    """(n,) int64: the span index of each token of the block (n: the block's tokens, if known: no device sync)."""
    return repeat_by_counts(None, segmentation.lengths, n)


def vectors_per_span(segmentation: Segmentation, max_vectors: int, first_of_block: Tensor | None = None) -> Tensor:
    """(n_spans,) int64 in 1..max_vectors: how many index vectors each span gets.

    Rule: with q_k = S_k / length_k (triangle score per token) and q_nb the larger of the two
    neighbours' q (0 at the block's edges or when negative), a span kept by NMS with q_k > 0 has
    uncertainty u_k = q_nb / (q_k + q_nb): 0 when it stands alone above weak neighbours, 1/2 next to
    an equally strong one, towards 1 next to a stronger one. Spans made by gap filling, or with
    q_k <= 0, have u_k = 1. count_k = 1 + round(u_k * (max_vectors - 1)), never more than the span's
    length. So the count never rises with the span's own score and never falls with its neighbours'.
    first_of_block: (n_spans,) bool, for the spans of several blocks one after another (``joined``): True
    where a block begins (its span has no left neighbour, the span before it no right one); None: one block.
    """
    if max_vectors < 1:
        raise ValueError(f"max_vectors must be at least 1, got {max_vectors}")
    lengths = segmentation.lengths
    if lengths.numel() == 0:
        return torch.zeros_like(lengths)
    per_token = segmentation.scores.double() / lengths.clamp(min=1)  # (n_spans,)
    positive = per_token.clamp(min=0)
    zero = positive.new_zeros(1)
    left, right = torch.cat([zero, positive[:-1]]), torch.cat([positive[1:], zero])
    if first_of_block is not None:
        left = left.masked_fill(first_of_block, 0.0)
        right = right.masked_fill(torch.cat([first_of_block[1:], first_of_block.new_ones(1)]), 0.0)
    neighbours = torch.maximum(left, right)  # (n_spans,)
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


@dataclass(frozen=True)
class SpanKeys:
    """One block's spans and what their index vectors are chosen from."""

    keys: Tensor  # (nheads_kv, n, headdim) pre-RoPE
    attention: Tensor  # (nheads_kv, n, n) the block's attention averaged over each KV head's query heads
    segmentation: Segmentation


@dataclass(frozen=True)
class IndexVectors:
    """One block's index vectors: vectors (nheads_kv, total, headdim), spans in order; span_of_vector (total,) and
    lengths (n_spans,) int64 on the host."""

    vectors: Tensor
    span_of_vector: Tensor
    lengths: Tensor


def joined(segmentations: list[Segmentation]) -> tuple[Segmentation, Tensor, Tensor]:
    """The spans of several blocks one after another (starts within their own block), the block of each span
    (n_spans,) int64 and first_of_block (n_spans,) bool, on the first block's device."""
    device = segmentations[0].starts.device
    fields = [torch.cat(parts) for parts in zip(*(segmentation_fields(seg) for seg in segmentations), strict=True)]
    counts = torch.tensor([seg.n_spans for seg in segmentations])
    block = repeat_by_counts(None, counts).to(device, non_blocking=True)
    first = torch.zeros(int(counts.sum()), dtype=torch.bool)
    first[(torch.cumsum(counts, 0) - counts)[counts > 0]] = True
    return Segmentation(*fields), block, first.to(device, non_blocking=True)


def segmentation_fields(segmentation: Segmentation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return segmentation.starts, segmentation.ends, segmentation.scores, segmentation.from_triangles


def top_attended_keys_of_blocks(blocks: list[SpanKeys], max_vectors: int) -> list[IndexVectors]:
    """Index vectors of many blocks of one size (a prefill chunk's layers) in one pass: each span gets
    vectors_per_span of its most attended keys, as top_attended_keys gives them one block at a time. One device
    sync for all blocks (their spans' lengths and counts come to the host together)."""
    if not blocks:
        return []
    spans, block_of_span, first_of_block = joined([block.segmentation for block in blocks])
    counts = vectors_per_span(spans, max_vectors, first_of_block)  # (n_spans,) on the device
    lengths = spans.lengths
    lengths_host, counts_host = torch.cat([lengths, counts]).cpu().split([lengths.numel(), counts.numel()])
    received = torch.stack([in_span_attention(block.attention.float(), block.segmentation) for block in blocks])
    keys = torch.stack([block.keys for block in blocks])  # (n_blocks, nheads_kv, n, headdim)
    vectors, span_of_vector = _top_keys(keys, received, spans, block_of_span, lengths_host, counts_host)
    spans_per_block = [block.segmentation.n_spans for block in blocks]
    vectors_per_block = [int(block_counts.sum()) for block_counts in counts_host.split(spans_per_block)]
    first_spans = itertools.accumulate(spans_per_block[:-1], initial=0)  # each block's first span among all
    pieces = zip(
        vectors.split(vectors_per_block, dim=1),
        span_of_vector.split(vectors_per_block),
        lengths_host.split(spans_per_block),
        first_spans,
        strict=True,
    )
    return [IndexVectors(block_vectors, owner - first, lengths) for block_vectors, owner, lengths, first in pieces]


def top_attended_keys(
    keys: Tensor, attention: Tensor, segmentation: Segmentation, counts: Tensor
) -> tuple[Tensor, Tensor]:
    """The counts[s] keys of each span s that its own queries attend to most, per KV head.

    keys: (nheads_kv, n, headdim) pre-RoPE; attention: (nheads_kv, n, n) the block's attention averaged
    over each KV head's query heads; counts: (n_spans,) int64 with 0 <= counts <= span length.
    Returns vectors (nheads_kv, total, headdim), total = counts.sum(), spans in order and each span's
    keys by received attention, most first; and span_of_vector (total,) int64 in 0..n_spans-1, on the keys' device.
    One device sync: the spans' lengths and the counts come to the host together (and are checked there).
    """
    nheads_kv, n, headdim = keys.shape
    lengths = segmentation.lengths
    if attention.shape != (nheads_kv, n, n) or counts.shape != lengths.shape:
        raise ValueError(f"keys {tuple(keys.shape)}, attention {tuple(attention.shape)} and counts do not match")
    lengths_host, counts_host = torch.cat([lengths, counts.to(lengths.device)]).cpu().split(lengths.numel())
    if int(lengths_host.sum()) != n:
        raise ValueError(f"the spans cover {int(lengths_host.sum())} tokens, the keys {n}")
    if not bool(((counts_host >= 0) & (counts_host <= lengths_host)).all()):
        raise ValueError("counts must lie in 0..span length")
    received = in_span_attention(attention.float(), segmentation)[None]  # (1, nheads_kv, n)
    block_of_span = torch.zeros_like(lengths)
    vectors, span_of_vector = _top_keys(keys[None], received, segmentation, block_of_span, lengths_host, counts_host)
    return vectors, span_of_vector.to(keys.device)


def _top_keys(
    keys: Tensor, received: Tensor, spans: Segmentation, block_of_span: Tensor, lengths: Tensor, counts: Tensor
) -> Tensor:
    """The counts[s] most received keys of each span s, spans in order: (nheads_kv, counts.sum(), headdim).

    keys (n_blocks, nheads_kv, n, headdim); received (n_blocks, nheads_kv, n) each token's in-span attention;
    spans: every block's spans one after another, starts within their block; block_of_span (n_spans,) on the
    device; lengths, counts (n_spans,) int64 on the host. Returns the vectors and span_of_vector (total,) int64
    on the host, each vector's span among all blocks' spans."""
    n_blocks, nheads_kv, n, headdim = keys.shape
    device = keys.device
    width = max(int(lengths.max()), 1) if lengths.numel() else 1
    k = max(int(counts.max()), 1) if counts.numel() else 1
    total = int(counts.sum())
    starts = spans.starts
    offsets = torch.arange(width, device=device)  # (width,)
    tokens = (starts[:, None] + offsets).clamp(max=n - 1)  # (n_spans, width)
    inside = offsets < spans.lengths[:, None]
    padded = received[block_of_span[:, None], :, tokens]  # (n_spans, width, nheads_kv)
    padded = padded.masked_fill(~inside[..., None], float("-inf"))
    best = torch.topk(padded, min(k, width), dim=1).indices  # (n_spans, k, nheads_kv) offsets, most attended first
    span_of_vector = repeat_by_counts(None, counts, total)  # (total,) host
    rank = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[span_of_vector]  # within its span, host
    span, rank = torch.stack([span_of_vector, rank]).to(device, non_blocking=True)
    picked = starts[span, None] + best[span, rank]  # (total, nheads_kv) token indices
    heads = torch.arange(nheads_kv, device=device)
    vectors = keys[block_of_span[span, None], heads[None, :], picked]  # (total, nheads_kv, headdim)
    return vectors.transpose(0, 1).contiguous(), span_of_vector


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
