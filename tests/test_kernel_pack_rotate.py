"""Pack-and-rotate kernel (a captured decode step's key set) against its torch reference in float64.

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
from ltri.kernels.pack_rotate import pack_rotate, pack_rotate_reference, pack_rotate_triton  # noqa: E402

# (n_sink, budget, window capacity, nheads_kv, headdim, n_retrieved): no sinks, none or all retrieved, awkward sizes
CASES = [(4, 37, 23, 3, 64, 20), (0, 16, 9, 1, 128, 16), (4, 97, 123, 8, 64, 0), (64, 123, 50, 2, 128, 97)]
N_ROWS = 500


def make_inputs(n_sink, budget, window, nheads_kv, headdim, n_retrieved, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    n_packed = n_sink + budget + window
    angles = torch.arange(n_packed)[:, None] * torch.rand(headdim // 2, generator=generator)[None, :]
    angles = torch.cat([angles, angles], dim=1)
    rows = torch.randint(0, N_ROWS, (budget,), generator=generator).to(DEVICE)
    return (
        randn(nheads_kv, n_sink, headdim), randn(nheads_kv, n_sink, headdim), randn(N_ROWS, 2, nheads_kv, headdim),
        rows, torch.tensor(n_retrieved, device=DEVICE), randn(nheads_kv, window, headdim),
        randn(nheads_kv, window, headdim), angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE),
    )  # fmt: skip


def in_float64(inputs):
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_float64_reference(case, dtype):
    inputs = make_inputs(*case, dtype)
    keys, values = pack_rotate_triton(*inputs)
    exact_keys, exact_values = pack_rotate_reference(*in_float64(inputs))
    torch_keys, torch_values = pack_rotate_reference(*inputs)
    assert keys.dtype == dtype and keys.shape == exact_keys.shape
    assert torch.equal(values, torch_values) and torch.equal(values.double(), exact_values)  # values only move
    kernel_error = (keys.double() - exact_keys).abs().max().item()
    torch_error = (torch_keys.double() - exact_keys).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-6


def test_places_hold_sinks_then_retrieved_rows_then_the_window():
    n_sink, budget, window, nheads_kv, headdim, n_retrieved = 3, 8, 6, 2, 64, 5
    inputs = list(make_inputs(n_sink, budget, window, nheads_kv, headdim, n_retrieved, torch.float32))
    n_packed = n_sink + budget + window
    inputs[7] = torch.ones(n_packed, headdim, device=DEVICE)  # cos 1, sin 0: no rotation
    inputs[8] = torch.zeros(n_packed, headdim, device=DEVICE)
    sink_keys, _, rows_source, rows, _, window_keys, _, _, _ = inputs
    keys, _ = pack_rotate_triton(*inputs)
    assert torch.equal(keys[:, :n_sink], sink_keys)
    assert torch.equal(keys[:, n_sink : n_sink + n_retrieved], rows_source[rows[:n_retrieved], 0].transpose(0, 1))
    assert torch.equal(keys[:, n_sink + n_retrieved : n_sink + n_retrieved + window], window_keys)
    assert torch.all(keys[:, n_sink + n_retrieved + window :] == window_keys[:, -1:])  # past the window: its last slot


def test_dispatch_runs_the_kernel_here():
    inputs = make_inputs(*CASES[0], torch.float32)
    for got, expected in zip(pack_rotate(*inputs), pack_rotate_triton(*inputs), strict=True):
        assert torch.equal(got, expected)


def test_bad_inputs_get_one_sentence():
    inputs = list(make_inputs(*CASES[0], torch.float32))
    for at, bad, message in [
        (7, inputs[7][:-1], "cos and sin must be"),
        (3, inputs[3].int(), "rows \\(B,\\) int64"),
        (2, inputs[2][:, :, :1], "sinks \\(nheads_kv, S, headdim\\)"),
        (6, inputs[6][:, :-1], "same shape"),
    ]:
        broken = list(inputs)
        broken[at] = bad
        for pack in (pack_rotate_triton, pack_rotate_reference):
            with pytest.raises(ValueError, match=message):
                pack(*broken)
