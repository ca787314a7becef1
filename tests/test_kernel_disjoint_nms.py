"""Disjoint NMS (kernel and torch reference) against a plain Python greedy NMS and against ltri.spans.greedy_nms.

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
from ltri.kernels.disjoint_nms import disjoint_nms, disjoint_nms_reference, disjoint_nms_triton, prefix_best  # noqa: E402

from ltri.spans import candidate_grid, greedy_nms, triangle_scores  # noqa: E402

# (n_blocks, n, min_len, max_len, tied): scores drawn from few values when tied, so that ties decide often
CASES = [(1, 1, 1, 1, False), (3, 97, 8, 16, False), (2, 123, 4, 40, True), (1, 300, 8, 128, True), (4, 64, 1, 1, True)]


def make_grid(n_blocks, n, min_len, max_len, tied, seed=0):
    """(n_blocks, n, n_lengths) float64: about half the candidates positive, -inf elsewhere and past the block."""
    generator = torch.Generator().manual_seed(seed)
    n_lengths = max(min(max_len, n) - min_len + 1, 0)
    values = torch.randn(n_blocks, n, n_lengths, generator=generator, dtype=torch.float64)
    if tied:
        values = values.mul(2).round()
    ends = torch.arange(n)[:, None] + min_len + torch.arange(n_lengths)[None, :]
    return values.masked_fill(~(values > 0) | (ends > n), float("-inf"))


def python_nms(grid, min_len):
    """Textbook greedy NMS over (start, length) candidates in order, each block alone: list of (start, end) lists."""
    out = []
    for block in grid.tolist():
        candidates = [
            (score, start, start + min_len + j)
            for start, row in enumerate(block)
            for j, score in enumerate(row)
            if score > float("-inf")
        ]
        candidates.sort(key=lambda c: -c[0])  # stable: of equal scores the earlier (start, length) stays first
        kept = []
        for _, start, end in candidates:
            if all(end <= a or start >= b for a, b in kept):
                kept.append((start, end))
        out.append(kept)
    return out


def as_lists(picks):
    return [[tuple(pair) for pair in block if pair[0] >= 0] for block in picks.tolist()]


@pytest.mark.parametrize("case", CASES)
def test_kernel_and_reference_equal_textbook_nms(case):
    grid = make_grid(*case)
    expected = python_nms(grid, case[2])
    for nms in (disjoint_nms_triton, disjoint_nms_reference):
        picks = nms(grid.to(DEVICE), case[2])
        assert picks.shape == (case[0], case[1] // case[2], 2) and picks.dtype == torch.long
        assert as_lists(picks.cpu()) == expected


@pytest.mark.parametrize("seed", range(3))
def test_equals_greedy_nms_on_triangle_scores(seed):
    """The spans' own candidate grid (random causal attention): the same picks as the general greedy NMS."""
    generator = torch.Generator().manual_seed(seed)
    n, min_len, max_len = 160, 8, 32
    attention = torch.rand(2, n, n, generator=generator, dtype=torch.float64).tril()
    attention /= attention.sum(-1, keepdim=True)
    candidates = candidate_grid(triangle_scores(attention, None, max_len), n, min_len, max_len)
    general = as_lists(greedy_nms(candidates, 0.0))
    grid = candidates.scores.view(2, n, -1)
    assert as_lists(disjoint_nms(grid.to(DEVICE), min_len).cpu()) == general
    assert as_lists(disjoint_nms_reference(grid, min_len)) == general


def test_prefix_best_takes_the_shortest_length_reaching_the_best():
    grid = torch.tensor([[[float("-inf"), 1.0, 3.0, 3.0, 2.0, 5.0]]], dtype=torch.float64)
    best, arg = prefix_best(grid)
    assert best.tolist() == [[[float("-inf"), 1.0, 3.0, 3.0, 3.0, 5.0]]]
    assert arg.tolist() == [[[0, 1, 2, 2, 2, 5]]]


def test_no_candidates_and_bad_input():
    empty = torch.full((2, 50, 9), float("-inf"), dtype=torch.float64, device=DEVICE)
    assert (disjoint_nms(empty, 8) == -1).all()
    assert disjoint_nms(torch.zeros(1, 5, 0, dtype=torch.float64, device=DEVICE), 8).shape == (1, 0, 2)
    with pytest.raises(ValueError, match="float64"):
        disjoint_nms(empty.float(), 8)
    with pytest.raises(ValueError, match="min_len"):
        disjoint_nms(empty, 0)
