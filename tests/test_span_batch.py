"""segment_many: the same segmentation as segment on each block, in far fewer torch operations."""

import pytest
import torch
from test_spans import SETTINGS, check_cover, planted_attention, random_lengths
from torch.profiler import ProfilerActivity, profile

from ltri.span_batch import segment_many
from ltri.spans import Segmentation, segment

FIELDS = ("starts", "ends", "scores", "from_triangles")


def softmax_attention(n, temperature, seed):
    """(n, n) causal softmax of random logits."""
    logits = torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * temperature
    return torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=1)


def uniform_attention(n):
    return torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]


def mixed_blocks(n, seed=0):
    """(n_blocks, n, n): blocks unlike each other: planted triangles (clean and noisy), random softmax
    attention (sharp and flat) and uniform attention (no triangle at all)."""
    blocks = [softmax_attention(n, 5.0, seed), softmax_attention(n, 0.1, seed + 1), uniform_attention(n)]
    if n >= 16:
        lengths = random_lengths(n, 8, 128, seed)
        blocks += [planted_attention(lengths), planted_attention(lengths, seed=seed, **SETTINGS["diagonal spikes"])]
    return torch.stack(blocks)


def tied_blocks(n_triangles=12, length=16):
    """Blocks whose candidates tie exactly (dyadic values: exact float64 sums): equal triangles, the same
    shifted by 5 tokens, and constant cells."""
    n = n_triangles * length
    span = torch.arange(n) // length
    triangles = ((span[:, None] == span[None, :]) & torch.ones(n, n).tril().bool()).float() / length
    return torch.stack([triangles, triangles.roll((5, 5), (0, 1)).tril(), torch.ones(n, n).tril() / 4])


def assert_same(many: list[Segmentation], looped: list[Segmentation]):
    assert len(many) == len(looped)
    for got, want in zip(many, looped, strict=True):
        for field in FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field


def looped_segment(attention, *args):
    return [segment(block, *args) for block in attention]


@pytest.mark.parametrize("nms_iou", [0.0, 0.4])
@pytest.mark.parametrize("theta", [None, 0.01, 1.0])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 37, 129, 300])
def test_same_as_segment_per_block(n, theta, nms_iou):
    attention = mixed_blocks(n, seed=n)
    many = segment_many(attention, theta, 8, 128, nms_iou, batched=True)
    assert_same(many, looped_segment(attention, theta, 8, 128, nms_iou))
    for seg in many:
        check_cover(seg, n)


@pytest.mark.parametrize("nms_iou", [0.0, 0.3])
def test_same_as_segment_on_512_tokens(nms_iou):
    attention = torch.stack(
        [
            planted_attention(random_lengths(512, 8, 128, seed), seed=seed, **SETTINGS[setting])
            for seed, setting in enumerate(SETTINGS)
        ]
        + [uniform_attention(512), softmax_attention(512, 3.0, 9)]
    )
    for theta in (None, 0.004):
        assert_same(
            segment_many(attention, theta, nms_iou=nms_iou, batched=True),
            looped_segment(attention, theta, 8, 128, nms_iou),
        )


def test_same_as_segment_on_1024_tokens():
    lengths = random_lengths(1024, 8, 128, 11)
    attention = torch.stack(
        [
            planted_attention(lengths, seed=11, **SETTINGS["steep background"]),
            planted_attention(lengths),
            uniform_attention(1024),
        ]
    )
    many = segment_many(attention, batched=True)
    assert_same(many, looped_segment(attention))
    assert many[1].starts[1:].tolist() == torch.tensor(lengths).cumsum(0)[:-1].tolist()  # clean triangles found exactly
    assert not many[2].from_triangles.any()


@pytest.mark.parametrize("bounds", [(1, 1), (4, 7), (16, 64), (8, 512)])
def test_same_as_segment_with_other_bounds(bounds):
    attention = mixed_blocks(200, seed=3)
    for nms_iou in (0.0, 0.5):
        assert_same(
            segment_many(attention, None, *bounds, nms_iou, batched=True),
            looped_segment(attention, None, *bounds, nms_iou),
        )


def test_exact_ties_go_to_the_first_candidate():
    attention = tied_blocks()
    for theta in (1 / 64, 1 / 32):
        many = segment_many(attention, theta, 8, 128, batched=True)
        assert_same(many, looped_segment(attention, theta, 8, 128, 0.0))
    assert many[0].starts.tolist() == list(range(0, 192, 16)) and many[0].from_triangles.all()


def test_per_row_theta_and_the_default_path():
    attention = mixed_blocks(129, seed=5)
    theta = torch.rand(attention.shape[:2], generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 50
    want = [segment(block, row_theta) for block, row_theta in zip(attention, theta, strict=True)]
    assert_same(segment_many(attention, theta, batched=True), want)
    assert_same(segment_many(attention, theta), want)  # on the CPU: one block after the other
    with pytest.raises(ValueError):
        segment_many(attention, theta[:, :5], batched=True)


def test_bf16_input_and_edge_shapes():
    attention = mixed_blocks(64, seed=2).bfloat16()
    assert_same(segment_many(attention, batched=True), looped_segment(attention))
    assert segment_many(torch.zeros(0, 9, 9), batched=True) == []
    empty = segment_many(torch.zeros(2, 0, 0), batched=True)
    assert len(empty) == 2 and all(seg.n_spans == 0 and seg.starts.dtype == torch.int64 for seg in empty)
    for bad in (torch.zeros(4, 4), torch.zeros(2, 4, 5)):
        with pytest.raises(ValueError):
            segment_many(bad, batched=True)
    with pytest.raises(ValueError):
        segment_many(attention, min_len=10, max_len=15, batched=True)
    with pytest.raises(ValueError):
        segment_many(attention, nms_iou=1.0, batched=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_as_segment_on_cuda():
    attention = mixed_blocks(300, seed=7).cuda()
    for nms_iou in (0.0, 0.4):
        many = segment_many(attention, nms_iou=nms_iou)  # batched by default off the CPU
        assert all(seg.starts.device == attention.device for seg in many)
        assert_same(many, looped_segment(attention, None, 8, 128, nms_iou))


def torch_ops(run) -> int:
    """torch operations run() dispatches from Python (top-level profiler events: each at least one
    kernel launch on a GPU, nested ones not counted)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for event in prof.events() if event.name.startswith("aten::") and event.cpu_parent is None)


def test_batching_is_real():
    """32 blocks (the layers of one chunk) in one call dispatch far fewer operations than 32 calls."""
    attention = torch.stack(
        [
            planted_attention(random_lengths(256, 8, 128, seed), seed=seed, **SETTINGS["background and sink"])
            for seed in range(32)
        ]
    )
    batched = torch_ops(lambda: segment_many(attention, batched=True))
    looped = torch_ops(lambda: looped_segment(attention))
    print(f"torch operations for 32 blocks of 256 tokens: batched {batched}, looped {looped}")
    assert batched < looped / 4
