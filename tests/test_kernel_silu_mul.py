"""The gated MLP's activation kernel (``kernels/silu_mul.py``) against a float64 reference and its torch reference.

Without CUDA the kernel runs in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, case_id, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.silu_mul import silu_mul, silu_mul_reference, silu_mul_triton  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# (rows, intermediate): a decode step's one row (SmolLM2's 1536, Llama-3-8B's 14336), awkward widths
CASES = [(1, 1536), (1, 14336), (3, 97), (2, 1025)]


def make_inputs(n_rows, width, dtype, seed=0):
    """gate spread wide (silu's both tails: large negative gates give -0.0), up around 1."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(n_rows, width, generator=gen) * 6
    up = torch.randn(n_rows, width, generator=gen)
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_error_is_within_twice_torchs(case, dtype):
    gate, up = make_inputs(*case, dtype)
    out = silu_mul_triton(gate, up)
    expected = silu_mul_reference(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    truth = torch.nn.functional.silu(gate.double()) * up.double()
    kernel_error = (out.double() - truth).abs().max().item()
    torch_error = (expected.double() - truth).abs().max().item()
    assert kernel_error <= 2 * torch_error + ATOL[dtype]
    assert not out.isnan().any()


def test_dispatch_and_bad_input():
    gate, up = make_inputs(2, 64, torch.float32)
    assert torch.allclose(silu_mul(gate, up), silu_mul_reference(gate, up), atol=1e-6)
    with pytest.raises(ValueError, match="alike"):
        silu_mul_triton(gate, up[:, :-1])
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_triton(gate, up.half())
