"""Span votes: the formula, the Triton kernels against a float64 reference, the top spans, the checks.

Without CUDA the kernels run in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import use_triton  # noqa: E402
from ltri.kernels.span_votes import span_votes, span_votes_reference, span_votes_triton  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (nheads_kv, group, n_spans, headdim): each nheads_kv 1, 3, 8, group 1, 3, 4 (Llama-3-8B's 8 x 4), n_spans 1, 97,
# 123, 1025, 4030 and headdim 64, 128 appear, not every combination (the interpreter is slow: CI's time)
CASES = [
    (1, 4, 1, 64), (1, 4, 97, 128), (3, 1, 123, 64), (3, 1, 1025, 128), (8, 3, 97, 128), (8, 3, 4030, 64),
    (8, 4, 123, 128), (8, 4, 1025, 64), (8, 4, 4030, 128),
]  # fmt: skip


def make_inputs(nheads_kv, group, n_spans, headdim, dtype, seed=0):
    """q (nheads, headdim) with a few large components (as real queries have); bounds [kmax; kmin] of spans
    of random keys, kmax >= kmin."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nheads_kv * group, headdim, generator=gen) * (1 + 4 * torch.rand(headdim, generator=gen) ** 4)
    centre = torch.randn(nheads_kv, headdim, n_spans, generator=gen)
    half_width = torch.rand(nheads_kv, headdim, n_spans, generator=gen)
    bounds = torch.cat([centre + half_width, centre - half_width], dim=1)
    return q.to(DEVICE, dtype), bounds.to(DEVICE, dtype)


def scaled_upper_bounds(q, bounds):
    """The heads' logits (nheads_kv, group, n_spans) float32 (float64 for float64 inputs), the matmul in the
    inputs' precision."""
    nheads_kv, two_headdim, _ = bounds.shape
    q_bound = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1).view(nheads_kv, -1, two_headdim)
    return torch.bmm(q_bound, bounds).to(torch.promote_types(q.dtype, torch.float32)) * (2.0 / two_headdim) ** 0.5


def plain_torch(q, bounds):
    """benchmarks/speed/attention.py's span_votes: the matmul in the inputs' precision."""
    return torch.softmax(scaled_upper_bounds(q, bounds), dim=-1).sum(dim=(0, 1))


def test_reference_is_the_documented_formula():
    q, bounds = make_inputs(2, 3, 97, 64, torch.float32)
    q, bounds = q.cpu().double(), bounds.cpu().double()
    expected = torch.zeros(97, dtype=torch.float64)
    for h, q_h in enumerate(q):
        kmax, kmin = bounds[h // 3, :64], bounds[h // 3, 64:]
        upper = (q_h.clamp(min=0)[:, None] * kmax + q_h.clamp(max=0)[:, None] * kmin).sum(0)
        expected += torch.softmax(upper / 8.0, dim=0)
    got = span_votes_reference(q, bounds)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-g{}-n{}-d{}".format(*c))
def test_matches_float64_reference_and_top_spans(case, dtype):
    nheads_kv, group, n_spans, headdim = case
    q, bounds = make_inputs(nheads_kv, group, n_spans, headdim, dtype)
    assert use_triton(q, bounds), "the test must exercise the Triton kernels"
    votes = span_votes(q, bounds)
    ref = span_votes_reference(q.double(), bounds.double())
    assert votes.shape == (n_spans,) and votes.dtype == torch.float32
    err = (votes.double() - ref).abs().max().item()
    err_torch = (plain_torch(q, bounds).double() - ref).abs().max().item()
    # The probabilities kernel takes exp(logit - lse), where torch takes exp(logit - max) / sum: the head's lse,
    # rounded to float32 (twice: in its block, then over the blocks), puts a few float32 ulps of the largest logit
    # on each probability, relative; torch's max is one of the logits, exactly.
    lse_rounding = 4 * torch.finfo(torch.float32).eps * scaled_upper_bounds(q.double(), bounds.double()).abs().max()
    assert err <= 2 * err_torch + ATOL[dtype] + lse_rounding.item() * ref.max().item()
    assert abs(votes.double().sum().item() - nheads_kv * group) <= 1e-5 * nheads_kv * group

    top = min(64, n_spans)
    assert torch.equal(votes.topk(top).indices.sort().values, ref.topk(top).indices.sort().values)


def test_bad_inputs_raise():
    q, bounds = make_inputs(2, 2, 97, 64, torch.float32)
    with pytest.raises(ValueError, match="wants q"):
        span_votes(q[None], bounds)
    with pytest.raises(ValueError, match="wants q"):
        span_votes(q, bounds[0])
    with pytest.raises(ValueError, match="2 \\* headdim"):
        span_votes(q[:, :32], bounds)
    with pytest.raises(ValueError, match="multiple of nheads_kv"):
        span_votes(q[:3], bounds)
    with pytest.raises(ValueError, match="one dtype"):
        span_votes(q.half(), bounds)
    with pytest.raises(ValueError, match="contiguous in the span axis"):
        span_votes_triton(q, bounds.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        span_votes_triton(q.double(), bounds.double())
    with pytest.raises(ValueError, match="power-of-2 headdims"):
        span_votes_triton(q[:, :48], bounds[:, :96])


def test_no_spans():
    q, bounds = make_inputs(2, 2, 0, 64, torch.float32)
    assert span_votes(q, bounds).shape == (0,)
