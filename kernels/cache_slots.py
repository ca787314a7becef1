"""The row cache's slots after a decode step: the rows the step retrieved become the ones the cache holds, each at its
place in the step's retrieved list (``ltri.offload.row_cache``), in one launch.

    slots        (n_rows + 1,) int32   each stored row's place in the cache, -1 for none; the last entry is scratch
    held         (C,) int64            the rows the cache holds, at their places (the first count valid)
    count        (1,) int64            how many it holds
    rows         (B,) int64            the step's retrieved rows, distinct, the first n_retrieved valid (B <= C)
    n_retrieved  () or (1,) int64
    hits         (2,) int64            running sums: retrieved rows the cache held before the call, rows retrieved

or, for a cache whose KV heads hold their own rows (a token selection's: each head attends to its own), slots
(H, n_rows + 1), held (H, C), count (H,) and rows (H, B): H caches of the shape above, one a head, sharing
n_retrieved and hits (which then count a row once a head).

After the call: slots[held[j]] = -1 for j < the old count, then slots[rows[i]] = i for i < n_retrieved; held[:B] = rows;
count = n_retrieved; hits[0] += the valid rows whose slot was set before the call, hits[1] += n_retrieved. (A row
held before and retrieved again gets its new place.) Every tensor stays on the device and
keeps its address: a captured step's graph calls this every step.

The kernel is one program a head: it counts the retrieved rows already held, clears the old places, waits for every
thread (a barrier orders the block's global writes), then writes the new ones; the heads' programs add their counts
to hits atomically. The torch reference sends masked-out lanes to the scratch entry (no boolean indexing, no host
sync). CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK = 1024  # rows a loop step


def _cache_slots_kernel(
    slots_ptr, held_ptr, count_ptr, rows_ptr, n_retrieved_ptr, hits_ptr, capacity, budget,
    stride_slots, stride_held, stride_rows, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program a head's cache: the retrieved rows already held counted, the held rows' slots cleared, a barrier,
    the retrieved rows' slots set and held."""
    head = tl.program_id(0).to(tl.int64)
    slots_ptr += head * stride_slots
    held_ptr += head * stride_held
    count_ptr += head
    rows_ptr += head * stride_rows
    n_retrieved = tl.load(n_retrieved_ptr)
    n_hit = tl.zeros([BLOCK], tl.int64)
    for offset in range(0, budget, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        valid = (places < budget) & (places < n_retrieved)
        row = tl.load(rows_ptr + places, mask=valid, other=0)
        n_hit += (tl.load(slots_ptr + row, mask=valid, other=-1) >= 0).to(tl.int64)
    tl.atomic_add(hits_ptr, tl.sum(n_hit, axis=0))
    tl.atomic_add(hits_ptr + 1, n_retrieved.to(tl.int64))
    tl.debug_barrier()
    old_count = tl.load(count_ptr)
    for offset in range(0, capacity, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        was_held = (places < old_count) & (places < capacity)
        row = tl.load(held_ptr + places, mask=was_held, other=0)
        tl.store(slots_ptr + row, tl.full([BLOCK], -1, tl.int32), mask=was_held)
    tl.debug_barrier()
    for offset in range(0, budget, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        listed = places < budget
        row = tl.load(rows_ptr + places, mask=listed, other=0)
        tl.store(slots_ptr + row, places.to(tl.int32), mask=listed & (places < n_retrieved))
        tl.store(held_ptr + places, row, mask=listed)
    tl.store(count_ptr, n_retrieved.to(tl.int64))


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_cache_slots_kernel)


def _check_inputs(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    if slots.dim() not in (1, 2) or slots.dtype != torch.int32:
        raise ValueError(f"slots must be (n_rows + 1,) or (heads, n_rows + 1) int32, got {slots.dtype} "
                         f"{tuple(slots.shape)}.")  # fmt: skip
    heads = slots.shape[:-1]
    if held.shape[:-1] != heads or rows.shape[:-1] != heads or held.dim() != slots.dim() or rows.dim() != slots.dim():
        raise ValueError(f"held and rows must be {'1-D' if not heads else f'({heads[0]}, n)'} like the slots, got "
                         f"{tuple(held.shape)} and {tuple(rows.shape)}.")  # fmt: skip
    if held.dtype != torch.long or rows.dtype != torch.long:
        raise ValueError(f"held and rows must be int64, got {held.dtype} and {rows.dtype}.")
    if rows.shape[-1] > held.shape[-1]:
        raise ValueError(f"the cache holds {held.shape[-1]} rows, fewer than the {rows.shape[-1]} retrieved.")
    if count.numel() != math.prod(heads) or n_retrieved.numel() != 1 or count.dtype != torch.long:
        raise ValueError("count must be one int64 a head and n_retrieved one integer.")
    if hits.shape != (2,) or hits.dtype != torch.long:
        raise ValueError(f"hits must be (2,) int64, got {hits.dtype} {tuple(hits.shape)}.")
    if any(t.device != slots.device for t in (held, count, rows, n_retrieved, hits)):
        raise ValueError("cache_slots' tensors must be on one device.")
    if any(t.stride(-1) != 1 for t in (slots, held, rows)) or not count.is_contiguous():
        raise ValueError("cache_slots wants the slots, held rows, rows and counts contiguous in their last dimension.")


def _by_head(slots, held, count, rows) -> tuple[torch.Tensor, ...]:
    """Views (H, ...) of the tensors of one cache (H = 1) or of one a head."""
    if slots.dim() == 1:
        return slots[None], held[None], count.view(1), rows[None]
    return slots, held, count.view(-1), rows


def refresh_slots_triton(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    """The kernel's launch; same contract as refresh_slots."""
    _check_inputs(slots, held, count, rows, n_retrieved, hits)
    slots, held, count, rows = _by_head(slots, held, count, rows)
    _triton_kernels(interpreting())[(slots.shape[0],)](
        slots, held, count, rows, n_retrieved, hits, held.shape[1], rows.shape[1],
        slots.stride(0), held.stride(0), rows.stride(0), BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip


def refresh_slots_reference(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    """Plain torch, in place: masked-out lanes write the scratch entry (the last)."""
    _check_inputs(slots, held, count, rows, n_retrieved, hits)
    slots, held, count, rows = _by_head(slots, held, count, rows)
    heads, scratch = slots.shape[0], slots.shape[1] - 1
    places = torch.arange(rows.shape[1], device=rows.device)
    retrieved = places < n_retrieved.reshape(1)  # (B,)
    at = torch.where(retrieved, rows, scratch)  # (H, B)
    hits[0] += ((slots.gather(1, at) >= 0) & retrieved).sum()
    hits[1] += n_retrieved.reshape(()) * heads
    was_held = torch.arange(held.shape[1], device=held.device) < count[:, None]  # (H, C)
    slots.scatter_(1, torch.where(was_held, held, scratch), -1)
    slots.scatter_(1, at, torch.where(retrieved, places, -1).to(torch.int32).expand(heads, -1))
    held[:, : rows.shape[1]] = rows
    count.copy_(n_retrieved.reshape(1).expand(heads))


def refresh_slots(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    """The cache's slots, held rows and count after a step that retrieved rows (see the module's docstring), in
    place. The kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(slots, held, count, rows, n_retrieved, hits):
        refresh_slots_triton(slots, held, count, rows, n_retrieved, hits)
    else:
        refresh_slots_reference(slots, held, count, rows, n_retrieved, hits)
