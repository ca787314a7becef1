"""The decode step's RMS norm kernel (``kernels/rms_norm.py``) against a float64 reference and its torch reference,
with and without the residual add before it.

Without CUDA the kernel runs in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, case_id, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.rms_norm import rms_norm, rms_norm_reference, rms_norm_triton  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
EPS = 1e-5
# (rows, hidden): a decode step's one row (SmolLM2's 576, Llama-3-8B's 4096), awkward widths, Qwen3's per-head rows
CASES = [(1, 576), (1, 4096), (3, 97), (2, 1025), (32, 128)]


def make_inputs(n_rows, hidden, dtype, seed=0):
    """x, residual (rows of different scales, as a residual stream has) and a weight around 1."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.1 + 10 * torch.rand(n_rows, 1, generator=gen)
    x = torch.randn(n_rows, hidden, generator=gen) * scale
    residual = torch.randn(n_rows, hidden, generator=gen) * scale
    weight = 1 + 0.3 * torch.randn(hidden, generator=gen)
    return x.to(DEVICE, dtype), residual.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def exact(x, weight, residual):
    """The norm in float64 of the inputs as given (the residual added in float64 too)."""
    s = x.double() if residual is None else x.double() + residual.double()
    return weight.double() * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
def test_kernel_error_is_within_twice_torchs(case, dtype, with_residual):
    x, residual, weight = make_inputs(*case, dtype)
    residual = residual if with_residual else None
    normed, summed = rms_norm_triton(x, weight, EPS, residual)
    expected_normed, expected_summed = rms_norm_reference(x, weight, EPS, residual)
    assert normed.dtype == dtype and normed.shape == x.shape
    truth = exact(x, weight, residual)
    kernel_error = (normed.double() - truth).abs().max().item()
    torch_error = (expected_normed.double() - truth).abs().max().item()
    assert kernel_error <= 2 * torch_error + ATOL[dtype]
    if with_residual:  # the sum is one rounding of exact operands: the same bits as torch's
        assert torch.equal(summed, expected_summed)
    else:
        assert summed is None


def test_dispatch_and_bad_input():
    x, residual, weight = make_inputs(2, 64, torch.float32)
    normed, summed = rms_norm(x, weight, EPS, residual)
    expected, _ = rms_norm_reference(x, weight, EPS, residual)
    assert torch.allclose(normed, expected, atol=1e-6) and torch.equal(summed, x + residual)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, weight[:-1], EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(x, weight, EPS, residual[:1])
    with pytest.raises(ValueError, match="dtype"):
        rms_norm_triton(x, weight.half(), EPS)
