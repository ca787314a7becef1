"""SparQ scores: the formula, the Triton kernels against a float64 reference, top-k, mean-value reallocation.

Without CUDA the kernels run in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, case_id, cases_with_rows, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import use_triton  # noqa: E402
from ltri.kernels.sparq_scores import (  # noqa: E402
    mean_value_reallocation,
    selected_mass,
    sparq_scores,
    sparq_scores_reference,
    topk_tokens,
)
from ltri.kernels.sparse_attention import sparse_attention_reference  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (nheads_kv, group, n_keys, headdim, r, variable n_valid)
CASES = [
    (1, 1, 97, 64, 8, False),
    (3, 3, 123, 128, 32, True),
    (8, 4, 1025, 128, 16, True),
    (2, 4, 1025, 64, 12, False),
]
N_CACHE = 3000  # tokens of the key cache the rows index


def make_inputs(nheads_kv, group, n_keys, headdim, ragged, dtype, seed=0, n_cache=None):
    """q (nheads, headdim) with a few large components (as real queries have), k (n_cache tokens if given, else
    n_keys), n_valid (counting n_keys candidates)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nheads_kv * group, headdim, generator=gen) * (1 + 4 * torch.rand(headdim, generator=gen) ** 4)
    k = torch.randn(nheads_kv, n_cache or n_keys, headdim, generator=gen)
    n_valid = torch.randint(1, n_keys + 1, (nheads_kv,), generator=gen) if ragged else None
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), None if n_valid is None else n_valid.to(DEVICE)


def random_rows(n_cand, dtype, seed=1):
    """n_cand rows of an N_CACHE-token cache in random order, the last tenth repeating the first tenth."""
    rows = torch.randperm(N_CACHE, generator=torch.Generator().manual_seed(seed))[:n_cand]
    tail = n_cand // 10
    rows[n_cand - tail :] = rows[:tail]
    return rows.to(DEVICE, dtype)


def sparq_by_hand(q, k, r):
    """The documented formula, one KV group and one head at a time, float64 (no padding)."""
    nheads, headdim = q.shape
    nheads_kv, n_keys, _ = k.shape
    group = nheads // nheads_kv
    q, k = q.double(), k.double()
    scores = torch.zeros(nheads_kv, n_keys, dtype=torch.float64)
    for g in range(nheads_kv):
        heads = q[g * group : (g + 1) * group]
        idx = heads.abs().sum(0).topk(r).indices
        for q_h in heads:
            tau = math.sqrt(headdim * q_h[idx].abs().sum() / q_h.abs().sum())
            scores[g] += torch.softmax(k[g][:, idx] @ q_h[idx] / tau, dim=0)
    return scores


def plain_torch(q, k, r, n_valid):
    """The reference's steps in the inputs' precision (the logits matmul in dtype)."""
    nheads_kv, n_keys, _ = k.shape
    magnitude = q.float().abs().view(nheads_kv, -1, q.shape[1])
    idx = magnitude.sum(1).topk(r, dim=1).indices  # (nheads_kv, r)
    idx_heads = idx.repeat_interleave(q.shape[0] // nheads_kv, 0)
    tau = torch.sqrt(q.shape[1] * q.float().abs().gather(1, idx_heads).sum(1) / q.float().abs().sum(1))
    q_sel = (q.float().gather(1, idx_heads) / tau[:, None]).to(q.dtype).view(nheads_kv, -1, r)
    k_sel = k.gather(2, idx[:, None, :].expand(nheads_kv, n_keys, r))
    logits = (q_sel @ k_sel.transpose(1, 2)).float()
    if n_valid is not None:
        logits = logits.masked_fill(torch.arange(n_keys, device=k.device) >= n_valid[:, None, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(1)


def test_reference_is_the_documented_formula():
    q, k, _ = make_inputs(2, 3, 97, 64, False, torch.float32)
    expected = sparq_by_hand(q.cpu(), k.cpu(), 12)
    got = sparq_scores_reference(q.cpu().double(), k.cpu().double(), 12)
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=1e-6)


def test_all_components_give_the_exact_attention_probabilities():
    q, k, _ = make_inputs(2, 4, 123, 64, False, torch.float32)
    scores = sparq_scores(q, k, 64)
    _, lse = sparse_attention_reference(q.double()[:, None], k.double(), k.double())  # lse (nheads, 1)
    logits = torch.einsum("hgd,hnd->hgn", q.double().view(2, 4, 64), k.double()) / 8.0
    exact = torch.exp(logits - lse.double().view(2, 4, 1)).sum(1)
    torch.testing.assert_close(scores.double(), exact, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case, dtype, rows_dtype", cases_with_rows(CASES), ids=case_id)
def test_matches_float64_reference_and_topk(case, dtype, rows_dtype):
    nheads_kv, group, n_keys, headdim, r, ragged = case
    n_cache = None if rows_dtype is None else N_CACHE
    q, cache, n_valid = make_inputs(nheads_kv, group, n_keys, headdim, ragged, dtype, n_cache=n_cache)
    rows = None if rows_dtype is None else random_rows(n_keys, rows_dtype)
    k = cache if rows is None else cache[:, rows]  # the candidates
    assert use_triton(q, k), "the test must exercise the Triton kernels"
    scores = sparq_scores(q, cache, r, n_valid, rows)
    ref = sparq_scores_reference(q.double(), k.double(), r, n_valid).double()
    if rows is not None:  # read in place as gathered: the kernels' scores, the reference's exactly
        torch.testing.assert_close(scores, sparq_scores(q, k, r, n_valid), atol=ATOL[dtype], rtol=0)
        assert torch.equal(sparq_scores_reference(q.double(), cache.double(), r, n_valid, rows), ref)
    assert scores.shape == (nheads_kv, n_keys) and scores.dtype == torch.float32
    assert torch.equal(torch.isfinite(scores), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    err = (scores.double() - ref)[finite].abs().max().item()
    err_torch = (plain_torch(q, k, r, n_valid).double() - ref)[finite].abs().max().item()
    assert err <= 2 * err_torch + ATOL[dtype]
    torch.testing.assert_close(
        scores.double().where(finite, 0).sum(1), torch.full_like(ref[:, 0], group), atol=1e-5, rtol=0
    )

    top = min(32, n_keys) if n_valid is None else min(32, int(n_valid.min()))
    assert torch.equal(topk_tokens(scores, top, n_valid), topk_tokens(ref, top, n_valid))


def test_selected_mass_and_mean_value_reallocation():
    q, k, _ = make_inputs(2, 2, 97, 64, False, torch.float32)
    n_valid = torch.tensor([50, 97], device=DEVICE)
    scores = sparq_scores(q, k, 16, n_valid)
    everything = topk_tokens(scores, 97, n_valid)
    torch.testing.assert_close(selected_mass(scores, everything), torch.ones(2, device=DEVICE))
    few = topk_tokens(scores, 5, n_valid)
    mass = selected_mass(scores, few)
    expected = scores.gather(1, few).sum(1) / 2
    torch.testing.assert_close(mass, expected)

    out_selected = torch.randn(4, 1, 64, device=DEVICE)
    v_mean = torch.randn(2, 64, device=DEVICE)
    out = mean_value_reallocation(out_selected, mass, v_mean)
    alpha = mass.repeat_interleave(2)[:, None, None]
    torch.testing.assert_close(out, alpha * out_selected + (1 - alpha) * v_mean.repeat_interleave(2, 0)[:, None])
    all_mass = torch.ones(4, device=DEVICE)
    torch.testing.assert_close(mean_value_reallocation(out_selected, all_mass, v_mean), out_selected)


def test_clear_errors():
    q, k, _ = make_inputs(2, 2, 97, 64, False, torch.float32)
    with pytest.raises(ValueError, match="r must be"):
        sparq_scores(q, k, 65)
    with pytest.raises(ValueError, match="multiple of nheads_kv"):
        sparq_scores(q[:3], k, 8)
    with pytest.raises(ValueError, match="n_valid"):
        sparq_scores(q, k, 8, torch.tensor([3], device=DEVICE))
    rows = torch.arange(10, device=DEVICE)
    for bad in (rows[None], rows.float()):
        with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
            sparq_scores(q, k, 8, rows=bad)
        with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
            sparq_scores_reference(q, k, 8, rows=bad)


@pytest.mark.parametrize("r", [5, 16, 64])
def test_components_with_equal_magnitudes_go_to_the_lower_ones(r):
    """The kernels choose the group's components themselves: of equal summed |q| the lower component first, as
    topk_tokens (the reference's choice) does. With every |q| equal, the first r components."""
    gen = torch.Generator().manual_seed(r)
    q = torch.where(torch.rand(8, 64, generator=gen) < 0.5, -1.0, 1.0)  # 2 KV heads x group 4, all |q| = 1
    k = torch.randn(2, 77, 64, generator=gen)
    expected = sparq_scores_reference(q.double(), k.double(), r).float()
    tau = math.sqrt(64 * r / 64)  # sqrt(headdim * kept |q| / all |q|)
    by_hand = torch.stack([(k[g, :, :r] @ q[4 * g : 4 * g + 4, :r].T / tau).softmax(0).sum(1) for g in range(2)])
    got = sparq_scores(q.to(DEVICE), k.to(DEVICE), r).cpu()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected, by_hand, atol=1e-6, rtol=1e-5)
