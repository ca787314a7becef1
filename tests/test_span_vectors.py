"""Index vectors of spans: how many, which keys, and Quest's bound never under the best key."""

import pytest
import torch

from ltri.span_vectors import (
    SpanKeys,
    bound_query,
    key_bounds,
    segmentation_fields,
    top_attended_keys,
    top_attended_keys_of_blocks,
    vectors_per_span,
)
from ltri.spans import Segmentation, segment

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def spans(lengths, scores=None, from_triangles=None):
    lengths = torch.as_tensor(lengths)
    ends = torch.cumsum(lengths, 0)
    n_spans = lengths.numel()
    scores = torch.ones(n_spans) if scores is None else torch.as_tensor(scores, dtype=torch.float32)
    kept = torch.ones(n_spans, dtype=torch.bool) if from_triangles is None else torch.as_tensor(from_triangles)
    return Segmentation(ends - lengths, ends, scores, kept)


def test_vectors_per_span_rule():
    # per-token scores q = S / length: 1, 0 (gap-like), 3, 3, -1; the last two spans are gap-filled or weak.
    seg = spans([10, 10, 10, 10, 10, 10], [10, 0, 30, 30, -10, 20], [True, True, True, True, True, False])
    counts = vectors_per_span(seg, 5)
    # span 0: neighbour q 0 -> u 0 -> 1; span 1: q 0 -> 5; spans 2, 3: equal neighbours -> u 1/2 -> 3;
    # span 4: q < 0 -> 5; span 5: gap filling -> 5.
    assert counts.tolist() == [1, 5, 3, 3, 5, 5]
    assert counts.dtype == torch.int64
    assert vectors_per_span(seg, 1).tolist() == [1] * 6


def test_vectors_per_span_is_monotonic():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n_spans = int(torch.randint(1, 12, (1,), generator=generator))
        lengths = torch.randint(8, 40, (n_spans,), generator=generator)
        scores = torch.randn(n_spans, generator=generator) * 20
        kept = torch.rand(n_spans, generator=generator) < 0.7
        max_vectors = int(torch.randint(1, 9, (1,), generator=generator))
        base = vectors_per_span(spans(lengths, scores, kept), max_vectors)
        assert ((base >= 1) & (base <= max_vectors)).all()
        assert (base[~kept] == max_vectors).all()
        k = int(torch.randint(0, n_spans, (1,), generator=generator))
        stronger = scores.clone()
        stronger[k] += scores[k].abs() + 5
        assert vectors_per_span(spans(lengths, stronger, kept), max_vectors)[k] <= base[k]
        for neighbour in (k - 1, k + 1):
            if 0 <= neighbour < n_spans:
                louder = scores.clone()
                louder[neighbour] += scores[neighbour].abs() + 5
                assert vectors_per_span(spans(lengths, louder, kept), max_vectors)[k] >= base[k]


def test_vectors_per_span_never_exceeds_the_length():
    seg = spans([1, 2, 30], [-1, -1, -1], [False, False, False])
    assert vectors_per_span(seg, 4).tolist() == [1, 2, 4]


def test_top_attended_keys_picks_the_most_attended_tokens():
    """Per head, a weight per key; every query of a span spreads attention over its span's keys by
    those weights (so in-span column sums rank keys by weight * queries after them), plus heavy
    attention to keys of other spans, which must not count."""
    nheads_kv, headdim = 3, 8
    lengths = [5, 9, 1, 12, 6]
    n = sum(lengths)
    seg = spans(lengths)
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(nheads_kv, n, headdim, generator=generator)
    weight = torch.rand(nheads_kv, n, generator=generator) + 0.1
    span = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same = (span[:, None] == span[None, :]) & (j <= i)
    other = (span[:, None] != span[None, :]) & (j <= i)
    attention = weight[:, None, :] * same + 50.0 * other * (j == 0)  # everyone outside span 0 stares at token 0
    counts = torch.tensor([2, 4, 1, 0, 6])
    vectors, span_of_vector = top_attended_keys(keys, attention, seg, counts)
    assert vectors.shape == (nheads_kv, int(counts.sum()), headdim)
    assert span_of_vector.tolist() == [0, 0, 1, 1, 1, 1, 2, 4, 4, 4, 4, 4, 4]
    starts = seg.starts.tolist()
    for h in range(nheads_kv):
        expected = []
        for s, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            received = [(weight[h, t] * (start + length - t)).item() for t in range(start, start + length)]
            ranked = sorted(range(length), key=lambda k: -received[k])[: counts[s]]
            expected += [start + k for k in ranked]
        torch.testing.assert_close(vectors[h], keys[h, expected])


def test_top_attended_keys_on_a_real_segmentation():
    nheads_kv, n, headdim = 2, 200, 16
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(nheads_kv, n, n, generator=generator)
    attention = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=-1)
    seg = segment(attention.mean(0))
    counts = vectors_per_span(seg, 4)
    keys = torch.randn(nheads_kv, n, headdim, generator=generator, dtype=torch.bfloat16)
    vectors, span_of_vector = top_attended_keys(keys, attention, seg, counts)
    assert vectors.shape == (nheads_kv, int(counts.sum()), headdim) and vectors.dtype == torch.bfloat16
    assert torch.equal(torch.bincount(span_of_vector, minlength=seg.n_spans), counts)
    # every vector is a key of its own span
    for h in range(nheads_kv):
        matches = (vectors[h][:, None, :] == keys[h][None, :, :]).all(-1)  # (total, n)
        token = matches.float().argmax(1)
        assert matches.any(1).all()
        assert ((token >= seg.starts[span_of_vector]) & (token < seg.ends[span_of_vector])).all()


def test_top_attended_keys_refuses_bad_counts():
    seg = spans([3, 4])
    keys, attention = torch.randn(1, 7, 4), torch.rand(1, 7, 7).tril()
    with pytest.raises(ValueError):
        top_attended_keys(keys, attention, seg, torch.tensor([4, 1]))
    with pytest.raises(ValueError):
        top_attended_keys(keys[:, :6], attention, seg, torch.tensor([1, 1]))


@pytest.mark.parametrize("device", DEVICES)
def test_bound_never_under_the_best_key(device):
    generator = torch.Generator().manual_seed(4)
    for trial in range(20):
        nheads_kv, headdim = 2, int(torch.randint(1, 65, (1,), generator=generator))
        lengths = torch.randint(1, 20, (int(torch.randint(1, 10, (1,), generator=generator)),), generator=generator)
        n = int(lengths.sum())
        seg = spans(lengths)
        on_device = Segmentation(*(field.to(device) for field in segmentation_fields(seg)))  # as the keys' own
        keys = torch.randn(nheads_kv, n, headdim, generator=generator, dtype=torch.float64) * (trial % 3 + 1)
        queries = torch.randn(nheads_kv, 30, headdim, generator=generator, dtype=torch.float64)
        bounds = key_bounds(keys.to(device), on_device)  # (nheads_kv, n_spans, 2 * headdim)
        assert bounds.shape == (nheads_kv, seg.n_spans, 2 * headdim)
        bound_scores = bound_query(queries.to(device)) @ bounds.transpose(1, 2)  # (nheads_kv, 30, n_spans)
        span = torch.repeat_interleave(torch.arange(seg.n_spans), lengths)
        true = queries @ keys.transpose(1, 2)  # (nheads_kv, 30, n)
        best = torch.full((nheads_kv, 30, seg.n_spans), float("-inf"), dtype=torch.float64)
        best = best.scatter_reduce(2, span.expand(nheads_kv, 30, n), true, "amax")
        assert (bound_scores.cpu() >= best - 1e-9).all()
        single = lengths == 1
        torch.testing.assert_close(bound_scores.cpu()[..., single], best[..., single])


def test_key_bounds_are_the_elementwise_extremes():
    keys = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]]])  # (1, 3, 2)
    bounds = key_bounds(keys, spans([2, 1]))
    assert bounds.tolist() == [[[3.0, 0.5, 1.0, -2.0], [-1.0, 4.0, -1.0, 4.0]]]
    assert bound_query(torch.tensor([2.0, -3.0])).tolist() == [2.0, 0.0, 0.0, -3.0]
    assert key_bounds(keys.bfloat16(), spans([3])).dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_at_once_equal_one_block_at_a_time(device):
    """A chunk's layers in one pass (the deferred segmentation's): the same vectors, spans and counts as each
    block alone, with the neighbours of vectors_per_span never reaching into the next block."""
    nheads_kv, n, headdim = 2, 150, 8
    generator = torch.Generator().manual_seed(5)
    blocks = []
    for layer in range(4):
        logits = torch.randn(nheads_kv, n, n, generator=generator) * (1 + layer)
        attention = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=-1)
        keys = torch.randn(nheads_kv, n, headdim, generator=generator)
        seg = segment(attention.mean(0), min_len=4, max_len=16)
        blocks.append(
            SpanKeys(
                keys.to(device), attention.to(device), Segmentation(*(f.to(device) for f in segmentation_fields(seg)))
            )
        )
    made = top_attended_keys_of_blocks(blocks, 4)
    assert len(made) == len(blocks)
    for block, got in zip(blocks, made, strict=True):
        counts = vectors_per_span(block.segmentation, 4)
        vectors, span_of_vector = top_attended_keys(block.keys, block.attention, block.segmentation, counts)
        assert torch.equal(got.vectors, vectors) and torch.equal(got.span_of_vector, span_of_vector.cpu())
        assert torch.equal(got.lengths, block.segmentation.lengths.cpu())
        assert got.span_of_vector.device.type == "cpu" and got.lengths.device.type == "cpu"
    assert top_attended_keys_of_blocks([], 4) == []
