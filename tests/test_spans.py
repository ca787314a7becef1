"""Span segmentation on planted attention: boundaries found, every token covered once, bounds kept."""

import itertools

import pytest
import torch

from ltri.spans import (
    Segmentation,
    _first_owner,
    _owner_by_cover,
    _owner_of_disjoint,
    default_theta,
    segment,
    sink_columns,
    triangle_scores,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def planted_attention(
    lengths,
    local=1.0,
    background=0.0,
    sink=0.0,
    n_sinks=1,
    decay=0.5,
    diagonal=0.0,
    previous=0.0,
    noise=0.0,
    seed=0,
):
    """A causal (n, n) attention block, rows summing to 1: a triangle per planted span (each row spread
    evenly over its span's keys so far), a background decaying with distance, sink columns 0..n_sinks-1,
    diagonal and previous-token spikes, and log-normal noise."""
    lengths = torch.as_tensor(lengths)
    n = int(lengths.sum())
    span = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = j <= i

    def rows_to_one(x):
        x = x.double() * causal
        return x / x.sum(1, keepdim=True).clamp(min=1e-30)

    a = local * rows_to_one(span[:, None] == span[None, :])
    a = a + background * rows_to_one((i - j + 1).clamp(min=1).double().pow(-decay))
    a = a + sink * rows_to_one((j < n_sinks).expand(n, n))
    a = a + diagonal * torch.eye(n, dtype=torch.float64) + previous * torch.diag(torch.ones(n - 1), -1).double()
    generator = torch.Generator().manual_seed(seed)
    a = a * torch.exp(noise * torch.randn(n, n, generator=generator, dtype=torch.float64))
    return rows_to_one(a).float()


def random_lengths(n, low, high, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(min(int(torch.randint(low, high + 1, (1,), generator=generator)), n - sum(lengths)))
    return lengths


def boundaries(lengths):
    return list(itertools.accumulate(lengths))[:-1]


def inner_boundaries(lengths, min_len=8, max_len=128):
    """Boundaries between two planted spans that both have a length the segmentation can produce."""
    ends = boundaries(lengths)
    return [ends[k] for k in range(len(ends)) if all(min_len <= length <= max_len for length in lengths[k : k + 2])]


def check_cover(seg: Segmentation, n: int, min_len: int = 8, max_len: int = 128):
    """Spans tile 0..n-1 in order; every span within bounds, except the documented cases."""
    assert seg.starts.dtype == seg.ends.dtype == torch.int64
    assert seg.scores.dtype == torch.float32 and seg.from_triangles.dtype == torch.bool
    assert seg.starts.shape == seg.ends.shape == seg.scores.shape == seg.from_triangles.shape
    starts, ends = seg.starts.tolist(), seg.ends.tolist()
    assert starts[0] == 0 and ends[-1] == n and starts[1:] == ends[:-1]
    lengths = seg.lengths.tolist()
    assert all(1 <= length <= max_len for length in lengths)
    if n < min_len:
        assert lengths == [n]
        return
    for k, length in enumerate(lengths):
        if length < min_len:
            # A short gap left alone: gap-filled, between kept spans (or the block's edge) that lack the room.
            neighbours = [m for m in (k - 1, k + 1) if 0 <= m < len(lengths)]
            assert not seg.from_triangles[k] and all(seg.from_triangles[m] for m in neighbours)
            assert sum(max_len - lengths[m] for m in neighbours) < length


def recovery(seg: Segmentation, lengths, tolerance):
    """(found planted, planted) over inner boundaries, (predicted near a planted one, predicted)."""
    planted, predicted = inner_boundaries(lengths), seg.starts[1:].tolist()
    everything = boundaries(lengths)
    found = sum(any(abs(b - p) <= tolerance for p in predicted) for b in planted)
    right = sum(any(abs(b - p) <= tolerance for b in everything) for p in predicted)
    return found, len(planted), right, len(predicted)


def test_scores_are_the_triangle_sums():
    n = 37
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(n, n, generator=generator).tril()
    attention = attention / attention.sum(1, keepdim=True)
    per_row = torch.rand(n, generator=generator, dtype=torch.float64) / 10
    x, y = torch.triu_indices(n, n)  # every [x, y] with x <= y: (n_pairs,)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    inside = (x[:, None, None] <= j) & (j <= i) & (i <= y[:, None, None])  # (n_pairs, n, n)
    for theta in (0.03, per_row):
        rows_theta = theta if isinstance(theta, torch.Tensor) else torch.full((n,), theta, dtype=torch.float64)
        want = ((attention.double() - rows_theta[:, None]) * inside).sum((1, 2))
        torch.testing.assert_close(triangle_scores(attention, theta)(x, y + 1), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_clean_planted_triangles_recovered_exactly(seed):
    lengths = random_lengths(512, 8, 128, seed)
    lengths[-1:] = [lengths[-1]] if lengths[-1] >= 8 else []  # a last span under min_len cannot exist
    n = sum(lengths)
    seg = segment(planted_attention(lengths))
    check_cover(seg, n)
    assert seg.starts[1:].tolist() == boundaries(lengths)
    assert seg.from_triangles[1:].all()  # the first one may come from gap filling: its rows look uniform


SETTINGS = {
    "background and sink": dict(local=0.6, background=0.25, sink=0.15, noise=0.3),
    "strong sinks": dict(local=0.5, background=0.2, sink=0.3, n_sinks=2, noise=0.3),
    "steep background": dict(local=0.5, background=0.35, sink=0.15, decay=1.0, noise=0.3),
    "diagonal spikes": dict(local=0.45, background=0.2, sink=0.15, diagonal=0.12, previous=0.08, noise=0.3),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_realistic_planted_triangles_recovered_within_one(setting):
    """Over 8 blocks: >= 95% of the planted boundaries (between spans of 8..128 tokens) found within +-1,
    >= 90% exactly; >= 85% of the cut points within +-1 of a planted boundary."""
    totals = torch.zeros(4)
    exact = 0
    for seed in range(8):
        lengths = random_lengths(512, 8, 128, seed)
        seg = segment(planted_attention(lengths, seed=seed, **SETTINGS[setting]))
        check_cover(seg, 512)
        totals += torch.tensor(recovery(seg, lengths, tolerance=1), dtype=torch.float32)
        exact += recovery(seg, lengths, tolerance=0)[0]
    found, planted, right, predicted = totals.tolist()
    assert found / planted >= 0.95 and exact / planted >= 0.9
    assert right / predicted >= 0.85


def test_planted_lengths_outside_the_bounds():
    """A 200-token triangle is cut inside but its own boundaries stay; a 5-token one joins a neighbour."""
    lengths = [40, 200, 30, 5, 60, 90, 87]
    for noise in (dict(), SETTINGS["background and sink"]):
        seg = segment(planted_attention(lengths, seed=3, **noise))
        check_cover(seg, 512)
        predicted = seg.starts.tolist()
        assert all(any(abs(b - p) <= 1 for p in predicted) for b in (40, 240, 335, 425))
        assert (270 in predicted) != (275 in predicted)  # the 5 tokens join one neighbour whole
        assert not any(270 < p < 275 for p in predicted)


def test_one_token_and_blocks_shorter_than_min_len():
    for n in (1, 2, 7):
        seg = segment(planted_attention([n]))
        check_cover(seg, n)
        assert seg.n_spans == 1 and not seg.from_triangles[0]


def test_empty_block():
    seg = segment(torch.zeros(0, 0))
    assert seg.n_spans == 0 and seg.starts.dtype == torch.int64


@pytest.mark.parametrize("n", [8, 9, 15, 16, 129, 300, 512])
def test_uniform_attention_has_no_triangles(n):
    attention = torch.ones(n, n).tril()
    attention = attention / attention.sum(1, keepdim=True)
    seg = segment(attention)
    check_cover(seg, n)
    assert not seg.from_triangles.any()
    pieces = -(-n // 128)
    assert seg.n_spans == pieces and seg.lengths.max() - seg.lengths.min() <= 1  # near-equal gap pieces


def test_one_more_than_max_len():
    lengths = [50, 79]  # 129 tokens = max_len + 1
    seg = segment(planted_attention(lengths))
    check_cover(seg, 129)
    assert seg.starts.tolist() == [0, 50]
    seg = segment(planted_attention([129]))
    check_cover(seg, 129)
    assert seg.n_spans == 2


def test_explicit_theta_versus_default():
    lengths = random_lengths(512, 8, 128, 5)
    attention = planted_attention(lengths, seed=5, **SETTINGS["background and sink"])
    default = segment(attention)
    same = segment(attention, theta=default_theta(attention, window=128))
    for a, b in zip(
        (default.starts, default.ends, default.scores, default.from_triangles),
        (same.starts, same.ends, same.scores, same.from_triangles),
        strict=True,
    ):
        assert torch.equal(a, b)
    none = segment(attention, theta=1.0)  # above every cell: no triangle anywhere
    check_cover(none, 512)
    assert not none.from_triangles.any()
    low = segment(attention, theta=0.001)  # a fixed low theta merges neighbours into max_len spans
    check_cover(low, 512)
    assert low.n_spans < default.n_spans
    with pytest.raises(ValueError):
        segment(attention, theta=torch.zeros(3))


def test_score_of_each_span_is_its_triangle_score():
    lengths = random_lengths(512, 8, 128, 2)
    attention = planted_attention(lengths, seed=2, **SETTINGS["strong sinks"])
    seg = segment(attention)
    scores = triangle_scores(attention, None, window=128)
    torch.testing.assert_close(seg.scores, scores(seg.starts, seg.ends).float())
    planted = set(zip([0] + boundaries(lengths), boundaries(lengths) + [512], strict=True))
    as_planted = [(s, e) in planted for s, e in zip(seg.starts.tolist(), seg.ends.tolist(), strict=True)]
    assert sum(as_planted) >= 6 and (seg.scores[torch.tensor(as_planted)] > 0).all()


def test_sinks_are_found():
    lengths = random_lengths(512, 8, 128, 4)
    attention = planted_attention(lengths, seed=4, **SETTINGS["strong sinks"])
    assert sink_columns(attention, 128).nonzero().flatten().tolist() == [0, 1]
    assert not sink_columns(planted_attention(lengths), 128).any()


@pytest.mark.parametrize("nms_iou", [0.3, 0.7])
def test_overlapping_nms_still_covers_once(nms_iou):
    for seed in range(3):
        lengths = random_lengths(300, 8, 128, seed)
        seg = segment(planted_attention(lengths, seed=seed, **SETTINGS["diagonal spikes"]), nms_iou=nms_iou)
        check_cover(seg, 300)


@pytest.mark.parametrize("min_len,max_len", [(1, 1), (4, 7), (16, 64), (8, 512)])
def test_other_bounds(min_len, max_len):
    for seed in range(3):
        lengths = random_lengths(200, 3, 90, seed)
        seg = segment(planted_attention(lengths, seed=seed, **SETTINGS["background and sink"]), None, min_len, max_len)
        check_cover(seg, 200, min_len, max_len)


def test_bad_bounds_refused():
    attention = planted_attention([20])
    with pytest.raises(ValueError):
        segment(attention, min_len=10, max_len=15)  # a 16-token gap could not be cut within 10..15
    with pytest.raises(ValueError):
        segment(attention, nms_iou=1.0)


def test_random_attention_always_covers():
    generator = torch.Generator().manual_seed(7)
    for n in (3, 8, 40, 130, 257):
        for temperature in (0.1, 1.0, 5.0):
            logits = torch.randn(n, n, generator=generator) * temperature
            attention = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=1)
            check_cover(segment(attention), n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_and_dtype(device, dtype):
    lengths = random_lengths(256, 8, 128, 6)
    attention = planted_attention(lengths, seed=6, **SETTINGS["background and sink"])
    reference = segment(attention)
    seg = segment(attention.to(device, dtype))
    assert seg.starts.device.type == device
    check_cover(Segmentation(*(t.cpu() for t in (seg.starts, seg.ends, seg.scores, seg.from_triangles))), 256)
    if dtype == torch.float32:
        assert torch.equal(seg.starts.cpu(), reference.starts)


def random_picks(n_blocks: int, n_rounds: int, n: int, disjoint: bool, seed: int) -> torch.Tensor:
    """(n_blocks, n_rounds, 2) picks (start, end), some (-1, -1): disjoint ones cut from a random partition."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.full((n_blocks, n_rounds, 2), -1, dtype=torch.long)
    for block in range(n_blocks):
        if disjoint:
            cuts = torch.randperm(n - 1, generator=generator)[: 2 * n_rounds].add(1).sort().values
            pairs = cuts.view(-1, 2)[torch.randperm(cuts.numel() // 2, generator=generator)]
        else:
            starts = torch.randint(0, n - 1, (n_rounds,), generator=generator)
            lengths = torch.randint(1, 40, (n_rounds,), generator=generator)
            pairs = torch.stack([starts, (starts + lengths).clamp(max=n)], 1)
        kept = int(torch.randint(0, n_rounds + 1, (1,), generator=generator))
        picks[block, :kept] = pairs[:kept]
    return picks


@pytest.mark.parametrize("disjoint", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_first_owner_of_disjoint_picks_equals_the_dense_cover(disjoint, seed):
    picks = random_picks(5, 12, 300, disjoint, seed)
    expected = _owner_by_cover(picks, 300)
    assert torch.equal(_first_owner(picks, 300), expected)
    fast = _owner_of_disjoint(picks, 300)
    if disjoint:
        assert fast is not None and torch.equal(fast, expected)
    elif bool((expected >= 0).sum() < (picks[..., 1] - picks[..., 0]).clamp(min=0).sum()):  # some overlap
        assert fast is None
