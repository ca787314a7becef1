"""Loki scores: PCA basis, projection, the Triton scoring kernel against a float64 reference, top-k.

Without CUDA the kernel runs in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import (  # noqa: E402, F401
    DEVICE,
    DTYPES,
    ROWS_DTYPES,
    case_id,
    cases_with_rows,
    interpret_without_cuda,
)
from ltri.kernels import CachedRows, use_triton  # noqa: E402
from ltri.kernels.lowrank_scores import (  # noqa: E402
    lowrank_scores,
    lowrank_scores_reference,
    lowrank_scores_triton,
    pca_basis,
    project_keys,
    reads_whole_rows,
    topk_tokens,
)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (nheads_kv, group, n_keys, headdim, rank, variable n_valid)
CASES = [
    (1, 1, 97, 64, 16, False),
    (3, 3, 123, 128, 32, True),
    (8, 4, 1025, 128, 24, True),
    (2, 4, 1025, 64, 64, False),
]
N_CACHE = 3000  # tokens of the key cache the rows index


def correlated_keys(nheads_kv, n, headdim, gen):
    """Keys with a common offset and a decaying spectrum, like a model's (nheads_kv, n, headdim)."""
    spectrum = torch.logspace(0, -2, headdim)
    mixing = torch.linalg.qr(torch.randn(nheads_kv, headdim, headdim, generator=gen)).Q
    keys = (torch.randn(nheads_kv, n, headdim, generator=gen) * spectrum) @ mixing
    return keys + 2.0 * torch.randn(nheads_kv, 1, headdim, generator=gen)


def make_inputs(nheads_kv, group, n_keys, headdim, rank, ragged, dtype, seed=0, n_cache=None):
    """q, keys_lowrank (n_cache tokens if given, else n_keys), basis, n_valid (counting n_keys candidates)."""
    gen = torch.Generator().manual_seed(seed)
    keys = correlated_keys(nheads_kv, n_cache or n_keys, headdim, gen)
    q = torch.randn(nheads_kv * group, headdim, generator=gen)
    basis = pca_basis(keys)
    keys_lowrank = project_keys(keys.to(dtype), basis, rank)
    n_valid = torch.randint(1, n_keys + 1, (nheads_kv,), generator=gen) if ragged else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(q.to(dtype)), to(keys_lowrank), to(basis), to(n_valid)


def token_major(keys_lowrank):
    """The same (nheads_kv, n, width) numbers as a view of token rows (n, nheads_kv, width) side by side: the stored
    projections' layout (``offload.projected_keys``), which the whole-row kernel reads a row at a time."""
    return keys_lowrank.transpose(0, 1).contiguous().transpose(0, 1)


def random_rows(n_cand, dtype, seed=1):
    """n_cand rows of an N_CACHE-token cache in random order, the last tenth repeating the first tenth."""
    rows = torch.randperm(N_CACHE, generator=torch.Generator().manual_seed(seed))[:n_cand]
    tail = n_cand // 10
    rows[n_cand - tail :] = rows[:tail]
    return rows.to(DEVICE, dtype)


def plain_torch(q, keys_lowrank, basis, rank):
    """The scores the obvious way in the inputs' precision."""
    nheads_kv = keys_lowrank.shape[0]
    q_low = q.view(nheads_kv, -1, q.shape[1]).sum(1)[:, None, :] @ basis[:, :, :rank].to(q.dtype)
    return (keys_lowrank[:, :, :rank] @ q_low.transpose(1, 2))[..., 0].float()


def test_pca_basis_is_orthonormal_and_sorted_by_variance():
    gen = torch.Generator().manual_seed(0)
    keys = correlated_keys(3, 500, 64, gen)
    basis = pca_basis(keys)
    assert basis.shape == (3, 64, 64) and basis.dtype == torch.float32
    eye = torch.eye(64).expand(3, 64, 64)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, eye, atol=1e-5, rtol=0)
    variance = ((keys - keys.mean(1, keepdim=True)) @ basis).var(dim=1, unbiased=False)  # (3, 64)
    assert torch.all(variance[:, :-1] >= variance[:, 1:] - 1e-6)
    # centered: the large common offset does not take the first component
    offset = keys.mean(1)
    offset_share = (offset[:, None, :] @ basis[:, :, :1])[..., 0, 0].abs() / offset.norm(dim=1)
    assert torch.all(offset_share < 0.9)


def test_full_rank_scores_are_the_groups_exact_dot_products():
    q, keys_lowrank, basis, _ = make_inputs(2, 3, 97, 64, 64, False, torch.float32)
    gen = torch.Generator().manual_seed(0)
    keys = correlated_keys(2, 97, 64, gen).to(DEVICE)  # the same keys make_inputs projected
    exact = torch.einsum("hgd,hnd->hn", q.view(2, 3, 64), keys)
    torch.testing.assert_close(lowrank_scores(q, project_keys(keys, basis, 64), basis, 64), exact, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("case, dtype, rows_dtype", cases_with_rows(CASES), ids=case_id)
def test_matches_float64_reference_and_topk(case, dtype, rows_dtype):
    nheads_kv, group, n_keys, headdim, rank, ragged = case
    q, cache, basis, n_valid = make_inputs(*case, dtype, n_cache=None if rows_dtype is None else N_CACHE)
    rows = None if rows_dtype is None else random_rows(n_keys, rows_dtype)
    keys_lowrank = cache if rows is None else cache[:, rows]  # the candidates
    assert use_triton(q, keys_lowrank, basis), "the test must exercise the Triton kernel"
    scores = lowrank_scores(q, cache, basis, rank, n_valid, rows)
    ref = lowrank_scores_reference(q.double(), keys_lowrank.double(), basis.double(), rank, n_valid).double()
    if rows is not None:  # read in place as gathered: the kernel's scores, the reference's exactly
        gathered = lowrank_scores(q, keys_lowrank, basis, rank, n_valid)
        atol = ATOL[dtype] * ref[torch.isfinite(ref)].abs().max().item()
        torch.testing.assert_close(scores, gathered, atol=atol, rtol=0)
        in_place = lowrank_scores_reference(q.double(), cache.double(), basis.double(), rank, n_valid, rows)
        assert torch.equal(in_place, ref)
    assert scores.shape == (nheads_kv, n_keys) and scores.dtype == torch.float32
    assert torch.equal(torch.isfinite(scores), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    err = (scores.double() - ref)[finite].abs().max().item()
    err_torch = (plain_torch(q, keys_lowrank, basis, rank).double() - ref)[finite].abs().max().item()
    assert err <= 2 * err_torch + ATOL[dtype] * ref[finite].abs().max().item()

    k = min(32, n_keys) if n_valid is None else min(32, int(n_valid.min()))
    assert torch.equal(topk_tokens(scores, k, n_valid), topk_tokens(ref, k, n_valid))


# (nheads_kv, group, candidates, headdim, rank, stored components a head): whole token rows read through rows
WHOLE_ROW_CASES = [
    (1, 1, 97, 64, 16, 16),
    (3, 3, 123, 64, 16, 16),
    (8, 4, 1025, 128, 24, 32),
]


@pytest.mark.parametrize("case", WHOLE_ROW_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_read_whole_token_rows_in_place(case, dtype):
    """The layout of the stored projections (``offload.projected_keys``): rows (n_rows, nheads_kv, width), read as
    (nheads_kv, n_rows, width) with the heads' stride the width and the tokens' stride nheads_kv x width: the
    whole-row kernel scores every head of a candidate from one read of its row, as the reference scores them
    gathered; the same rows in another layout take the per-head kernel."""
    nheads_kv, group, n_cand, headdim, rank, width = case
    q, cache, basis, n_valid = make_inputs(nheads_kv, group, n_cand, headdim, width, True, dtype, n_cache=N_CACHE)
    rows_view = token_major(cache)  # (nheads_kv, N_CACHE, width) view of rows
    head_major = torch.cat([cache, cache], dim=2)[:, :, :width]  # the same numbers, each row padded to 2 x width
    assert reads_whole_rows(rows_view) and not reads_whole_rows(head_major)
    rows = random_rows(n_cand, ROWS_DTYPES[nheads_kv % 2])
    got = lowrank_scores(q, rows_view, basis, rank, n_valid, rows)
    expected = lowrank_scores_reference(q.double(), cache.double(), basis.double(), rank, n_valid, rows).float()
    atol = ATOL[dtype] * float(expected[expected.isfinite()].abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)
    assert torch.equal(got.isinf(), expected.isinf())  # past each head's n_valid
    per_head = lowrank_scores(q, head_major, basis, rank, n_valid, rows)
    torch.testing.assert_close(got, per_head, rtol=1e-5, atol=atol)


def projection_cache(rows_view, n_cand, poisoned=False, seed=2):
    """A cache (``offload.row_cache``) holding about half of the token rows of rows_view at random places: copies of
    them or (poisoned) other values, so that a test can tell where a candidate was read from; out empty."""
    generator = torch.Generator().manual_seed(seed)
    n_rows = rows_view.shape[1]
    held = torch.randperm(n_rows, generator=generator)[: n_rows // 2].to(DEVICE)  # the row held at place i
    slots = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=DEVICE)
    slots[held] = torch.arange(held.numel(), dtype=torch.int32, device=DEVICE)
    copies = rows_view[:, held].transpose(0, 1).contiguous()  # (C, nheads_kv, width)
    if poisoned:
        copies = torch.randn(copies.shape, generator=generator).to(copies.dtype).to(DEVICE)
    return CachedRows(slots, copies, torch.zeros(n_cand, *copies.shape[1:], dtype=copies.dtype, device=DEVICE))


@pytest.mark.parametrize("case", WHOLE_ROW_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_cache_of_copies_scores_the_same_and_passes_the_rows_on(case, dtype):
    """With the cache the whole-row kernel (and the reference) score as without it, and write each candidate's row,
    as read, to the cache's out at the candidate's place."""
    nheads_kv, group, n_cand, headdim, rank, width = case
    q, cache, basis, n_valid = make_inputs(nheads_kv, group, n_cand, headdim, width, True, dtype, n_cache=N_CACHE)
    rows_view, rows = token_major(cache), random_rows(n_cand, torch.long)
    for score in (lowrank_scores_triton, lowrank_scores_reference):
        expected = score(q, rows_view, basis, rank, n_valid, rows)
        cached = projection_cache(rows_view, n_cand)
        assert torch.equal(score(q, rows_view, basis, rank, n_valid, rows, cached), expected)
        assert torch.equal(cached.out, rows_view[:, rows].transpose(0, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cached_projections_are_read_from_the_cache(dtype):
    nheads_kv, group, n_cand, headdim, rank, width = WHOLE_ROW_CASES[2]
    q, cache, basis, n_valid = make_inputs(nheads_kv, group, n_cand, headdim, width, True, dtype, n_cache=N_CACHE)
    rows_view, rows = token_major(cache), random_rows(n_cand, torch.long)
    got_cache, expected_cache = (projection_cache(rows_view, n_cand, poisoned=True) for _ in range(2))
    got = lowrank_scores_triton(q, rows_view, basis, rank, n_valid, rows, got_cache)
    expected = lowrank_scores_reference(q, rows_view, basis, rank, n_valid, rows, expected_cache)
    slots = got_cache.slots[rows].long()
    read = torch.where(
        (slots >= 0)[:, None, None], got_cache.rows[slots.clamp(min=0)], rows_view[:, rows].transpose(0, 1)
    )
    assert bool((slots >= 0).any()) and bool((slots < 0).any())  # both kinds of candidate in the case
    assert torch.equal(got_cache.out, read) and torch.equal(expected_cache.out, read)
    atol = ATOL[dtype] * float(expected[expected.isfinite()].abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)


def test_a_cache_needs_candidates_of_whole_rows_and_its_shapes():
    nheads_kv, group, n_cand, headdim, rank, width = WHOLE_ROW_CASES[1]
    q, cache, basis, n_valid = make_inputs(nheads_kv, group, n_cand, headdim, width, True, torch.float32,
                                           n_cache=N_CACHE)  # fmt: skip
    rows_view, rows = token_major(cache), random_rows(n_cand, torch.long)
    cached = projection_cache(rows_view, n_cand)
    for args, message in [
        ((rows_view, None, cached), "only for candidates \\(rows\\) of token rows read whole"),
        ((cache, rows, cached), "only for candidates \\(rows\\) of token rows read whole"),  # head-major
        ((rows_view, rows, cached._replace(out=cached.out[:-1])), "out \\(123, 3, 16\\)"),
        ((rows_view, rows, cached._replace(slots=cached.slots.long())), "slots \\(n,\\) int32"),
        ((rows_view, rows, cached._replace(rows=cached.rows.half())), "the projections' device, in its dtype"),
    ]:
        keys_lowrank, candidates, bad = args
        for score in (lowrank_scores_triton, lowrank_scores_reference):
            with pytest.raises(ValueError, match=message):
                score(q, keys_lowrank, basis, rank, n_valid, candidates, bad)


def test_topk_tokens_respects_n_valid_and_sorts():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [5.0, 4.0, 3.0, 2.0, 1.0]])
    n_valid = torch.tensor([3, 5])
    assert topk_tokens(scores, 2, n_valid).tolist() == [[1, 2], [0, 1]]
    padded = topk_tokens(scores, 4, torch.tensor([2, 5]))
    assert padded[0, :2].tolist() == [0, 1] and set(padded[0, 2:].tolist()) <= {2, 3, 4}
    with pytest.raises(ValueError, match="k must be"):
        topk_tokens(scores, 6)


def test_clear_errors():
    q, keys_lowrank, basis, _ = make_inputs(2, 2, 97, 64, 16, False, torch.float32)
    with pytest.raises(ValueError, match="fewer than rank"):
        lowrank_scores(q, keys_lowrank, basis, 32)
    with pytest.raises(ValueError, match="multiple of nheads_kv"):
        lowrank_scores(q[:3], keys_lowrank, basis, 16)
    with pytest.raises(ValueError, match="basis must be"):
        lowrank_scores(q, keys_lowrank, basis[:, :32], 16)
    rows = torch.arange(10, device=DEVICE)
    for bad in (rows[None], rows.float()):
        with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
            lowrank_scores(q, keys_lowrank, basis, 16, rows=bad)
        with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
            lowrank_scores_reference(q, keys_lowrank, basis, 16, rows=bad)
