"""Span maximum kernel (the shared votes' read) against a Python loop and against its torch reference.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA it runs compiled.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.span_max import span_max, span_max_reference, span_max_triton  # noqa: E402

# (n_spans, max_len, first): spans of 0..max_len positions tiling the rows after `first` positions
CASES = [(1, 1, 0), (97, 12, 5), (123, 100, 64), (1025, 128, 3), (300, 16, 0)]


def make_spans(n_spans, max_len, first, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_spans,), generator=generator)
    first_rows = torch.cumsum(lengths, 0) - lengths
    n_positions = first + int(lengths.sum()) + 7
    a = torch.randn(n_positions, generator=generator)
    b = torch.randn(n_positions, generator=generator)
    return (t.to(DEVICE) for t in (a, b, first_rows, lengths))


def looped(a, b, first, first_rows, lengths):
    values = (a + b).tolist()
    out = []
    for row, length in zip(first_rows.tolist(), lengths.tolist(), strict=True):
        out.append(max([0.0] + values[first + row : first + row + length]))
    return torch.tensor(out)


@pytest.mark.parametrize("case", CASES)
def test_kernel_and_reference_equal_a_loop(case):
    n_spans, max_len, first = case
    a, b, first_rows, lengths = make_spans(*case)
    expected = looped(a.cpu(), b.cpu(), first, first_rows.cpu(), lengths.cpu())
    got = span_max_triton(a, b, first, first_rows, lengths, max_len)
    reference = span_max_reference(a, b, first, first_rows, lengths, max_len)
    assert got.shape == (n_spans,) and got.dtype == torch.float32
    assert torch.allclose(got.cpu(), expected, atol=1e-6) and torch.allclose(reference.cpu(), expected, atol=1e-6)


def test_dispatch_and_empty_spans():
    a, b, first_rows, lengths = make_spans(50, 20, 2)
    assert torch.allclose(
        span_max(a, b, 2, first_rows, lengths, 20), span_max_reference(a, b, 2, first_rows, lengths, 20)
    )
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert span_max(a, b, 2, empty, empty, 20).shape == (0,)


def test_bad_inputs_are_refused():
    a, b, first_rows, lengths = make_spans(10, 8, 0)
    with pytest.raises(ValueError, match="float32"):
        span_max(a.double(), b.double(), 0, first_rows, lengths, 8)
    with pytest.raises(ValueError, match="int64"):
        span_max(a, b, 0, first_rows.int(), lengths.int(), 8)
    with pytest.raises(ValueError, match=r"\(n_spans,\)"):
        span_max(a, b, 0, first_rows, lengths[:-1], 8)
