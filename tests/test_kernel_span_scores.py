"""Span scores kernel against a float64 reference and against the scatter maximum it replaces.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support), in float32 and float16; with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.span_scores import (  # noqa: E402
    per_span_rows,
    span_scores,
    span_scores_reference,
    span_scores_triton,
)

from ltri.index.base import best_spans  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # relative to the largest score

# (nheads_kv, n_queries, n_spans, dim, max_vectors): totals of 97..1025 vectors, GQA groups of 1, 3, 4, 8
CASES = [(1, 1, 97, 64, 1), (3, 4, 41, 128, 3), (8, 4, 300, 128, 4), (2, 3, 123, 64, 2), (3, 8, 260, 64, 4)]


def make_index(nheads_kv, n_queries, n_spans, dim, max_vectors, dtype, seed=0, spare=7):
    """Queries and a grouped index: span s has count[s] in 1..max_vectors vectors from first[s]; the tables hold
    spare empty slots past the spans, and the buffer spare vectors past the valid ones."""
    generator = torch.Generator().manual_seed(seed)
    count = torch.randint(1, max_vectors + 1, (n_spans,), generator=generator)
    first = torch.cumsum(count, 0) - count
    n_vectors = int(count.sum())
    queries = torch.randn(nheads_kv, n_queries, dim, generator=generator).to(DEVICE)
    vectors = torch.randn(nheads_kv, n_vectors + spare, dim, generator=generator).to(DEVICE, dtype)
    first = torch.cat([first, torch.zeros(spare, dtype=torch.long)]).to(DEVICE)
    count = torch.cat([count, torch.zeros(spare, dtype=torch.long)]).to(DEVICE)
    return queries, vectors, first, count, torch.tensor(n_vectors, device=DEVICE)


def exact_span_scores(queries, vectors, first, count, n_slots):
    """float64 loops: each slot's best score, -inf when empty."""
    scores = torch.matmul(queries.to(vectors.dtype).double(), vectors.double().transpose(1, 2))
    out = torch.full((*scores.shape[:2], n_slots), float("-inf"), dtype=torch.float64, device=scores.device)
    for slot in range(min(n_slots, first.numel())):
        start, n = int(first[slot]), int(count[slot])
        if n > 0:
            out[:, :, slot] = scores[:, :, start : start + n].amax(dim=2)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_error_is_within_twice_plain_torchs(case, dtype):
    max_vectors = case[4]
    queries, vectors, first, count, n_valid = make_index(*case, dtype)
    n_slots = first.numel() + 3  # slots past the tables come back -inf too
    exact = exact_span_scores(queries, vectors, first, count, n_slots)
    plain = span_scores_reference(queries, vectors, first, count, n_valid, n_slots, max_vectors)
    got = span_scores_triton(queries, vectors, first, count, n_valid, n_slots, max_vectors)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    empty = exact == float("-inf")
    assert torch.equal(got == float("-inf"), empty) and torch.equal(plain == float("-inf"), empty)
    kernel_error = (got.double() - exact)[~empty].abs().max().item()
    torch_error = (plain.double() - exact)[~empty].abs().max().item()
    atol = ATOL[dtype] * exact[~empty].abs().max().item()
    assert kernel_error <= 2 * torch_error + atol, (kernel_error, torch_error, atol)


@pytest.mark.parametrize("case", CASES[:3])
def test_vectors_past_the_valid_count_are_left_out(case):
    queries, vectors, first, count, n_valid = make_index(*case, torch.float32)
    cut = n_valid - 5  # the last spans lose their last vectors; a span left with none scores -inf
    n_slots = first.numel()
    exact = exact_span_scores(queries, vectors, first, ((first + count).clamp(max=cut) - first).clamp(min=0), n_slots)
    exact = torch.where((first < cut)[None, None], exact, float("-inf"))
    got = span_scores(queries, vectors, first, count, cut, n_slots, case[4])
    assert torch.equal(got == float("-inf"), exact == float("-inf"))
    assert torch.allclose(got.double(), exact, atol=1e-4)


@pytest.mark.parametrize("case", CASES[:3])
def test_reference_equals_the_scatter_maximum_it_replaces(case):
    queries, vectors, first, count, n_valid = make_index(*case, torch.float32, spare=0)
    n_spans = first.numel()
    owner = torch.repeat_interleave(torch.arange(n_spans, device=DEVICE), count)
    expected, _ = best_spans(vector_scores_of(queries, vectors), owner, torch.arange(n_spans, device=DEVICE), n_spans)
    got = span_scores_reference(queries, vectors, first, count, n_valid, n_spans, case[4])
    assert torch.equal(got.sort(dim=2, descending=True).values, expected)


def vector_scores_of(queries, vectors):
    return torch.matmul(queries.float(), vectors.float().transpose(1, 2))


def test_per_span_rows_are_powers_of_two():
    assert [per_span_rows(n) for n in (0, 1, 2, 3, 4, 5, 8, 9)] == [1, 1, 2, 4, 4, 8, 8, 16]


def test_bad_tables_are_refused():
    queries, vectors, first, count, n_valid = make_index(2, 4, 30, 64, 2, torch.float32)
    with pytest.raises(ValueError, match="first and count"):
        span_scores(queries, vectors, first, count[:-1], n_valid, 10, 2)
    with pytest.raises(ValueError, match="int64"):
        span_scores(queries, vectors, first, count.int(), n_valid, 10, 2)
    with pytest.raises(ValueError, match="power-of-2"):
        span_scores_triton(queries[..., :48], vectors[..., :48], first, count, n_valid, 10, 2)
