"""Candidates' stored rows gathered into one buffer, each from the row cache where it holds the row, else from the
stored rows (over PCIe when they are pinned host rows read in place).

    source  (n_rows, *row)   the stored rows, any strides with each row's values contiguous (e.g. the keys of the
                             host rows: ``device_view()[:, 0]``, (n_rows, nheads_kv, headdim))
    rows    (B,) int64       the candidates' rows in source (not bounds-checked)
    cache   CachedRows       slots (>= n_rows,) int32, rows (C, *row) and out (B, *row), contiguous, source's dtype
  result: cache.out, with out[i] = cache.rows[slots[rows[i]]] where that slot is >= 0, else source[rows[i]]

SparQ's captured step scores every candidate's whole key (its components depend on the query), so it gathers the
4096 retrieved rows' keys a layer at 128K, 8 MB over PCIe (``benchmarks/speed/NOTES.md`` step 29: 28.6 GB/s inside
a graph on the H100). Consecutive steps retrieve many of the same rows (48% at step 43), so the gather reads those
from the copies the last step gathered (``offload.row_cache``, whose refresh then makes ``out`` the held rows).

The kernel gives each program _BLOCK_ROWS candidates, each read with one masked load from one of the two places.
CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math

import torch

from . import CachedRows, check_rows, interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_ROWS = 4  # candidates a program


def _cached_gather_kernel(
    source_ptr, rows_ptr, slots_ptr, cache_ptr, out_ptr, n_rows_out, stride_source, row_size,
    BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK_ROWS candidates, each row (row_size contiguous values) from the cache or the source."""
    places = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    listed = places < n_rows_out
    row = tl.load(rows_ptr + places, mask=listed, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + row, mask=listed, other=-1).to(tl.int64)
    cached = listed & (slot >= 0)
    stored = listed & (slot < 0)
    cols = tl.arange(0, BLOCK)
    in_row = (cols < row_size)[None, :]
    values = tl.load(source_ptr + row[:, None] * stride_source + cols[None, :], mask=stored[:, None] & in_row, other=0)
    at_cache = tl.where(cached, slot, 0)[:, None] * row_size + cols[None, :]
    copies = tl.load(cache_ptr + at_cache, mask=cached[:, None] & in_row, other=0)
    values = tl.where(cached[:, None], copies, values)  # a choice, not a sum: -0.0 stays -0.0
    tl.store(out_ptr + places.to(tl.int64)[:, None] * row_size + cols[None, :], values, mask=listed[:, None] & in_row)


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_cached_gather_kernel)


def _check_inputs(source: torch.Tensor, rows: torch.Tensor, cache: CachedRows) -> None:
    check_rows(rows, source.device)
    cache.check(tuple(source.shape[1:]), rows.shape[0], source, "cached_gather", "stored rows")


def cached_gather_triton(source: torch.Tensor, rows: torch.Tensor, cache: CachedRows) -> torch.Tensor:
    """The kernel's launch; same contract as cached_gather."""
    _check_inputs(source, rows, cache)
    if source.shape[0] and not source[0].is_contiguous():  # a row's values one run (the rows any stride apart)
        raise ValueError("cached_gather wants each stored row's values contiguous (rows may have any stride).")
    row_size = math.prod(source.shape[1:])
    if rows.numel():
        _triton_kernels(interpreting())[(-(-rows.numel() // _BLOCK_ROWS),)](
            source, rows.contiguous(), cache.slots, cache.rows, cache.out, rows.numel(), source.stride(0), row_size,
            BLOCK_ROWS=_BLOCK_ROWS, BLOCK=1 << max(row_size - 1, 0).bit_length(), num_warps=4,
        )  # fmt: skip
    return cache.out


def cached_gather_reference(source: torch.Tensor, rows: torch.Tensor, cache: CachedRows) -> torch.Tensor:
    """Plain torch: both places gathered, the cache's where its slot is set."""
    _check_inputs(source, rows, cache)
    slots = cache.slots[rows].long()
    held = (slots >= 0).view(-1, *[1] * (source.dim() - 1))
    cache.out.copy_(torch.where(held, cache.rows[slots.clamp(min=0)], source[rows]))
    return cache.out


def cached_gather(source: torch.Tensor, rows: torch.Tensor, cache: CachedRows) -> torch.Tensor:
    """cache.out (B, *row): the candidates' rows, each from the cache where it holds it, else from source (see the
    module's docstring). The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(source, rows, *cache):
        return cached_gather_triton(source, rows, cache)
    return cached_gather_reference(source, rows, cache)
