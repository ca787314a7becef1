"""Candidates' rows gathered from the row cache or the stored rows (``kernels/cached_gather.py``): the kernel against
its torch reference and against plain indexing.

Without CUDA the kernel runs in Triton's interpreter (see kernel_support).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, case_id, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import CachedRows  # noqa: E402
from ltri.kernels.cached_gather import cached_gather, cached_gather_reference, cached_gather_triton  # noqa: E402

# (stored rows, candidates, nheads_kv, headdim): one candidate, awkward counts, an 8B layer's keys
CASES = [(10, 1, 1, 64), (500, 97, 3, 64), (3000, 1025, 8, 128)]
GATHERS = [cached_gather_triton, cached_gather_reference]


def make_inputs(n_rows, n_cand, nheads_kv, headdim, dtype, seed=0, poisoned=False):
    """The keys of stored rows (n_rows, 2, nheads_kv, headdim) as SparQ's step reads them (a strided view), distinct
    candidates in random order, and a cache holding about half of the stored rows at random places: copies of their
    keys, or (poisoned) other values, so that a test can tell where a candidate was read from."""
    gen = torch.Generator().manual_seed(seed)
    stored = torch.randn(n_rows, 2, nheads_kv, headdim, generator=gen).to(DEVICE, dtype)
    stored[0, 0, 0, 0] = -0.0  # a negative zero, which a sum of the two places would turn positive
    source = stored[:, 0]  # (n_rows, nheads_kv, headdim), rows 2 x nheads_kv x headdim apart
    rows = torch.randperm(n_rows, generator=gen)[:n_cand].to(DEVICE)
    rows[0] = 0
    held = torch.randperm(n_rows, generator=gen)[: n_rows // 2].to(DEVICE)  # the row held at place i
    slots = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=DEVICE)
    slots[held] = torch.arange(held.numel(), dtype=torch.int32, device=DEVICE)
    copies = source[held].contiguous()
    if poisoned:
        copies = torch.randn(copies.shape, generator=gen).to(DEVICE, dtype)
    out = torch.full((n_cand, nheads_kv, headdim), 7.0, dtype=dtype, device=DEVICE)
    return source, rows, CachedRows(slots, copies, out)


@pytest.mark.parametrize("gather", GATHERS, ids=["kernel", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_a_cache_of_copies_gathers_what_indexing_gathers(case, dtype, gather):
    source, rows, cache = make_inputs(*case, dtype)
    got = gather(source, rows, cache)
    assert got is cache.out and torch.equal(got.view(torch.uint8), source[rows].view(torch.uint8))  # bit for bit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_held_rows_are_read_from_the_cache(case, dtype):
    source, rows, cache = make_inputs(*case, dtype, poisoned=True)
    got = cached_gather_triton(source, rows, cache).clone()
    expected = cached_gather_reference(source, rows, cache)
    slots = cache.slots[rows].long()
    by_hand = torch.stack([cache.rows[s] if s >= 0 else source[r] for r, s in zip(rows, slots, strict=True)])
    assert torch.equal(got, expected) and torch.equal(got, by_hand)
    assert case[1] < 10 or bool((slots >= 0).any()) and bool((slots < 0).any())  # both kinds of candidate


def test_dispatch_and_bad_input():
    source, rows, cache = make_inputs(*CASES[1], torch.float32)
    assert torch.equal(cached_gather(source, rows, cache), source[rows])
    for bad, message in [
        (cache._replace(out=cache.out[:-1]), "out \\(97, 3, 64\\)"),
        (cache._replace(rows=cache.rows[:, :2]), "rows \\(C, 3, 64\\)"),
        (cache._replace(slots=cache.slots.long()), "slots \\(n,\\) int32"),
        (cache._replace(rows=cache.rows.half()), "in its dtype"),
        (cache._replace(out=torch.empty(64, 3, 97, device=DEVICE).transpose(0, 2)), "contiguous"),
    ]:
        for gather in GATHERS:
            with pytest.raises(ValueError, match=message):
                gather(source, rows, bad)
    with pytest.raises(ValueError, match="each stored row's values contiguous"):
        cached_gather_triton(
            source.transpose(1, 2),
            rows,
            cache._replace(rows=cache.rows.transpose(1, 2).contiguous(), out=cache.out.transpose(1, 2).contiguous()),
        )
    with pytest.raises(ValueError, match="rows must be a 1-D int32/int64 tensor"):
        cached_gather(source, rows.float(), cache)
