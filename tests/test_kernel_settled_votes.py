"""Settled votes kernels (pool, shared votes, persistence in three launches) against their torch reference, and the
reference's pooling against a Python loop.

Without CUDA the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA they run compiled.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, case_id, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.settled_votes import (  # noqa: E402
    PersistArgs,
    SharedArgs,
    settled_votes,
    settled_votes_reference,
    settled_votes_triton,
)

# (nheads_kv, n_ask, k, n_slots, max_len, first): awkward sizes; k past n_slots leaves queries short of results;
# spans longer than the settle kernel's step (128 positions)
CASES = [
    (1, 1, 1, 1, 1, 0), (3, 4, 5, 97, 12, 5), (8, 4, 64, 1025, 16, 3), (2, 7, 9, 123, 100, 64), (3, 3, 30, 20, 4, 0),
    (2, 3, 8, 40, 300, 1),
]  # fmt: skip
PARTS = ["pool", "shared", "persist", "all", "all_no_record"]  # which of the steps run beside the pool


def make_results(nheads_kv, n_ask, k, n_slots, seed=0, dtype=torch.float32):
    """Scores and span ids (nheads_kv, n_ask, k): each query's ids distinct, its last ones -1 at random."""
    generator = torch.Generator().manual_seed(seed)
    n_queries = nheads_kv * n_ask
    ids = torch.stack([torch.randperm(max(n_slots, k), generator=generator)[:k] for _ in range(n_queries)])
    ids = torch.where(ids < n_slots, ids, -1)
    found = torch.randint(0, k + 1, (n_queries, 1), generator=generator)
    ids = torch.where(torch.arange(k)[None, :] < found, ids, -1).view(nheads_kv, n_ask, k)
    scores = (torch.randn(nheads_kv, n_ask, k, generator=generator) * 8).to(dtype)
    return scores.to(DEVICE), ids.to(DEVICE)


def make_state(n_slots, max_len, first, seed=1):
    """Shared votes over spans that tile the rows (some slots empty), their owner table, and remembered votes."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_slots,), generator=generator)
    first_rows = torch.cumsum(lengths, 0) - lengths
    owner = torch.repeat_interleave(torch.arange(n_slots), lengths)
    n_positions = first + owner.numel() + 5
    previous = torch.rand(n_positions, generator=generator) - 0.6
    current = torch.rand(n_positions, generator=generator) - 0.6
    remembered = torch.rand(n_slots + 3, generator=generator)
    remembered = remembered.masked_fill(torch.rand(n_slots + 3, generator=generator) < 0.4, 0.0)  # some never kept
    return [t.to(DEVICE) for t in (previous, current, first_rows, lengths, owner, remembered)]


def run(launch, case, part, how, seed=0, dtype=torch.float32):
    """(votes, current after, remembered after) of one launch over fresh copies of a case's state, scores in dtype."""
    nheads_kv, n_ask, k, n_slots, max_len, first = case
    scores, ids = make_results(nheads_kv, n_ask, k, n_slots, seed, dtype)
    previous, current, first_rows, lengths, owner, remembered = make_state(n_slots, max_len, first, seed + 1)
    shared = None
    if part in ("shared", "all", "all_no_record"):
        shared = SharedArgs(previous, current, first, first_rows, lengths, owner, max_len, 3, 0.7)
    persist = None
    if part in ("persist", "all", "all_no_record"):
        persist = PersistArgs(remembered, 0.8, record=part != "all_no_record")
    votes = launch(scores, ids, n_slots, 0.3, how, shared, persist)
    return votes, current, remembered


def assert_votes_close(got, expected):
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(expected).cpu())
    assert torch.allclose(got.cpu(), expected.cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("how", ["mean", "max"])
def test_kernels_equal_the_reference(case, part, how):
    got, got_current, got_remembered = run(settled_votes_triton, case, part, how)
    expected, expected_current, expected_remembered = run(settled_votes_reference, case, part, how)
    assert_votes_close(got, expected)
    assert torch.allclose(got_current.cpu(), expected_current.cpu(), atol=1e-6)  # published alike
    assert torch.allclose(got_remembered.cpu(), expected_remembered.cpu(), atol=1e-6)  # remembered alike


def looped_pool(scores, ids, n_slots, scale, how):
    """Each query's softmax over what it found, pooled by a Python loop (mean over all queries, or max)."""
    weights_of = {}
    k = scores.shape[-1]
    rows = list(zip(scores.reshape(-1, k).tolist(), ids.reshape(-1, k).tolist(), strict=True))
    for row_scores, row_ids in rows:
        found = [(s * scale, i) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0]
        if not found:
            continue
        top = max(s for s, _ in found)
        total = sum(math.exp(s - top) for s, _ in found)
        for s, i in found:
            weights_of.setdefault(i, []).append(math.exp(s - top) / total)
    votes = [float("-inf")] * n_slots
    for i, weights in weights_of.items():
        votes[i] = sum(weights) / len(rows) if how == "mean" else max(weights)
    return torch.tensor(votes)


@pytest.mark.parametrize("case", CASES[1:3], ids=case_id)
@pytest.mark.parametrize("how", ["mean", "max"])
def test_pooling_equals_a_loop(case, how):
    nheads_kv, n_ask, k, n_slots, _, _ = case
    scores, ids = make_results(nheads_kv, n_ask, k, n_slots)
    expected = looped_pool(scores.cpu(), ids.cpu(), n_slots, 0.3, how)
    for launch in (settled_votes_triton, settled_votes_reference):
        assert_votes_close(launch(scores, ids, n_slots, 0.3, how), expected)


@pytest.mark.parametrize("case", CASES[1:4], ids=case_id)
@pytest.mark.parametrize("launch", [settled_votes_triton, settled_votes_reference], ids=["kernel", "reference"])
def test_the_order_of_a_querys_results_does_not_change_a_bit(case, launch):
    """The captured search leaves each query's results unsorted, the eager one sorts them by score: both must pool
    to the same floats (a query's softmax sums its weights in sorted order)."""
    nheads_kv, n_ask, k, n_slots, _, _ = case
    scores, ids = make_results(nheads_kv, n_ask, k, n_slots, seed=7)
    shuffle = torch.rand(scores.shape, generator=torch.Generator().manual_seed(8)).argsort(dim=-1).to(DEVICE)
    # on a GPU the mean's atomic adds (the kernel's and index_add_'s) come in any order: its last bits vary anyway
    for how in ("max",) if str(DEVICE).startswith("cuda") else ("mean", "max"):
        expected = launch(scores, ids, n_slots, 0.3, how)
        got = launch(scores.gather(-1, shuffle), ids.gather(-1, shuffle), n_slots, 0.3, how)
        assert torch.equal(got, expected)


def test_half_precision_scores_and_the_dispatch():
    scores, ids = make_results(3, 4, 5, 97, dtype=torch.float16)
    expected = settled_votes_reference(scores, ids, 97, 0.3, "max")
    assert_votes_close(settled_votes(scores, ids, 97, 0.3, "max"), expected)
    assert_votes_close(settled_votes_triton(scores, ids, 97, 0.3, "max"), expected)


def test_nothing_found_and_no_slots():
    scores, ids = make_results(2, 3, 4, 10)
    nothing = torch.full_like(ids, -1)
    assert bool(torch.isinf(settled_votes_triton(scores, nothing, 10, 1.0)).all())
    assert settled_votes_triton(scores, ids, 0, 1.0).shape == (0,)


def test_bad_input_is_refused():
    scores, ids = make_results(2, 3, 4, 10)
    with pytest.raises(ValueError, match="how"):
        settled_votes(scores, ids, 10, 1.0, how="median")
    with pytest.raises(ValueError, match="span_ids"):
        settled_votes(scores, ids[0], 10, 1.0)
    with pytest.raises(ValueError, match="remembered"):
        settled_votes(scores, ids, 10, 1.0, persist=PersistArgs(torch.zeros(5, device=DEVICE), 0.5))


def test_more_results_than_one_pool_program_holds_take_the_reference(monkeypatch):
    import ltri.kernels.settled_votes as module

    scores, ids = make_results(3, 4, 5, 97)
    monkeypatch.setattr(module, "MAX_K", 4)
    monkeypatch.setattr(module, "settled_votes_triton", None)  # not called
    assert_votes_close(settled_votes(scores, ids, 97, 0.3, "max"), settled_votes_reference(scores, ids, 97, 0.3, "max"))
