"""Top-k by counted ranks (kernels/topk_rank.py) against the torch reference (a stable sort), ties, padding and
infinities included; the dispatch between it and topk_select's radix kernel.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import topk_rank  # noqa: E402
from ltri.kernels.sparse_attention import sparse_attention  # noqa: E402
from ltri.kernels.topk_rank import RANK_MAX_KEYS, RankLaunch, takes, topk_rank_triton  # noqa: E402
from ltri.kernels.topk_select import topk_tokens, topk_tokens_reference  # noqa: E402

# (n_rows, n_keys, k): awkward lengths, k of 1 to all, in every dtype; then the step's span votes (64 of 4,030),
# its token rows (1,024 of 2,048 for 8 KV heads) and a row the compaction reads in two chunks, each in one dtype
# (the interpreter takes 6-20 s for each of these: CI's time)
CASES = [(1, 97, 5), (3, 123, 123), (8, 1025, 64), (8, 128, 32), (4, 16, 1)]
LONG_CASES = [(1, 4030, 64), (8, 2048, 1024), (2, 4096 + 904, 1000)]
CASE_DTYPES = [(case, dtype) for case in CASES for dtype in DTYPES] + [
    (case, DTYPES[i % len(DTYPES)]) for i, case in enumerate(LONG_CASES)
]
LAUNCHES = [RankLaunch(16, 128, 2), RankLaunch(64, 512, 8), RankLaunch(32, 1024, 4)]


def random_scores(n_rows, n_keys, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n_keys, generator=generator).to(dtype).to(DEVICE)


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_matches_the_reference_and_torch_topk(case, dtype):
    n_rows, n_keys, k = case
    scores = random_scores(n_rows, n_keys, dtype)
    indices = topk_rank_triton(scores, k)
    assert indices.dtype == torch.long and indices.shape == (n_rows, k)
    assert torch.equal(indices, topk_tokens_reference(scores, k))
    assert torch.all(indices[:, 1:] > indices[:, :-1]), "indices must be strictly ascending"
    best = torch.topk(scores.float(), k, dim=1).values.sort(dim=1).values
    assert torch.equal(scores.float().gather(1, indices).sort(dim=1).values, best)


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: f"{launch.block_i}x{launch.block_j}x{launch.num_warps}")
@pytest.mark.parametrize("case", [(3, 123, 40), (1, 1500, 64), (2, 1000, 999)])
def test_every_launch_shape_chooses_the_same(case, launch):
    """Other block sizes and warps, half precision (many ties) and -0.0 against 0.0."""
    n_rows, n_keys, k = case
    scores = random_scores(n_rows, n_keys, torch.float16, seed=4)
    scores[:, ::7] = -0.0
    scores[:, 3::7] = 0.0
    assert torch.equal(topk_rank_triton(scores, k, launch=launch), topk_tokens_reference(scores, k))


@pytest.mark.parametrize("n_valid", [[0, 10, 300], [300, 300, 300], [1, 299, 57]])
def test_padding_ranks_below_every_valid_key(n_valid):
    scores = random_scores(3, 300, torch.float32, seed=1)
    scores[:, 250:] = 100.0  # padding with the best scores must still lose
    valid = torch.tensor(n_valid, device=DEVICE)
    indices = topk_rank_triton(scores, 120, valid)
    assert torch.equal(indices, topk_tokens_reference(scores, 120, valid))
    for row, count in enumerate(n_valid):
        kept = min(count, 120)
        assert torch.all(indices[row, :kept] < count) and torch.all(indices[row, kept:] >= count)


def test_ties_and_infinities_keep_the_reference_order():
    scores = torch.zeros(2, 200, device=DEVICE)
    scores[0, 150:] = 1.0  # 50 clear winners, then 30 of the 150 tied zeros: indices 0..29
    indices = topk_rank_triton(scores, 80)
    assert torch.equal(indices[0], torch.cat([torch.arange(30), torch.arange(150, 200)]).to(DEVICE))
    assert torch.equal(indices[1], torch.arange(80, device=DEVICE))
    values = [float("-inf"), -3.5, -1e-30, -0.0, 0.5, 1e30, float("inf")]
    signed = torch.tensor([values[::-1] + values], device=DEVICE)  # each value twice, descending then ascending
    for k in range(1, signed.shape[1] + 1):
        assert torch.equal(topk_rank_triton(signed, k), topk_tokens_reference(signed, k)), k


def test_strided_rows_empty_selections_and_launches_in_a_row():
    """Rows 600 apart, column-major scores, k = 0; then launches one after another and after the sparse kernel's
    fused merge, which count on the same tickets: each leaves them at zero for the next."""
    scores = random_scores(6, 300, torch.float32, seed=2)[::2, ::1]
    assert torch.equal(topk_rank_triton(scores, 17), topk_tokens_reference(scores, 17))
    assert topk_rank_triton(scores, 0).shape == (3, 0)
    column_major = random_scores(40, 5, torch.float32, seed=3).t()
    assert torch.equal(topk_rank_triton(column_major, 7), topk_tokens_reference(column_major, 7))
    q, kv = torch.randn(8, 1, 64, device=DEVICE), torch.randn(2, 2, 700, 64, device=DEVICE)
    for seed in range(3):
        sparse_attention(q, kv[0], kv[1])
        scores = random_scores(4, 515, torch.float32, seed=seed)
        assert torch.equal(topk_rank_triton(scores, 33), topk_tokens_reference(scores, 33)), seed


def test_rows_too_long_go_to_the_radix_kernel():
    long_row = random_scores(1, RANK_MAX_KEYS + 1, torch.float32, seed=6)
    assert not takes(long_row) and takes(long_row[:, :RANK_MAX_KEYS])
    with pytest.raises(ValueError, match="at most"):
        topk_rank_triton(long_row, 4)
    assert torch.equal(topk_tokens(long_row, 64), topk_tokens_reference(long_row, 64))


def test_the_dispatch_counts_ranks_for_short_rows(monkeypatch):
    scores = random_scores(3, 400, torch.float32, seed=7)
    calls = []
    monkeypatch.setattr(topk_rank, "topk_rank_triton", lambda *args: calls.append(args) or topk_rank_triton(*args))
    assert torch.equal(topk_tokens(scores, 50), topk_tokens_reference(scores, 50))
    assert len(calls) == 1
    monkeypatch.setattr(topk_rank, "RANK_MAX_KEYS", 0)  # off: the radix kernel alone
    assert torch.equal(topk_tokens(scores, 50), topk_tokens_reference(scores, 50))
    assert len(calls) == 1
