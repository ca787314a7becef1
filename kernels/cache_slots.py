"""The row cache's slots after a decode step: the rows the step retrieved become the ones the cache holds, each at its
place in the step's retrieved list (``ltri.offload.row_cache``), in one launch.

    slots        (n_rows + 1,) int32   each stored row's place in the cache, -1 for none; the last entry is scratch
    held         (C,) int64            the rows the cache holds, at their places (the first count valid)
    count        (1,) int64            how many it holds
    rows         (B,) int64            the step's retrieved rows, distinct, the first n_retrieved valid (B <= C)
    n_retrieved  () or (1,) int64
    hits         (2,) int64            running sums: retrieved rows the cache held before the call, rows retrieved

After the call: slots[held[j]] = -1 for j < the old count, then slots[rows[i]] = i for i < n_retrieved; held[:B] = rows;
count = n_retrieved; hits[0] += the valid rows whose slot was set before the call, hits[1] += n_retrieved. (A row
held before and retrieved again gets its new place.) Every tensor stays on the device and
keeps its address: a captured step's graph calls this every step.

The kernel is one program: it counts the retrieved rows already held, clears the old places, waits for every thread
(a barrier orders the block's global writes), then writes the new ones. The torch reference sends masked-out lanes to
the scratch entry (no boolean indexing, no host sync). CUDA tensors run the kernel, CPU tensors the reference, unless
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK = 1024  # rows a loop step


def _cache_slots_kernel(
    slots_ptr, held_ptr, count_ptr, rows_ptr, n_retrieved_ptr, hits_ptr, capacity, budget, BLOCK: tl.constexpr
):  # fmt: skip
    """One program: the retrieved rows already held counted, the held rows' slots cleared, a barrier, the retrieved
    rows' slots set and held."""
    n_retrieved = tl.load(n_retrieved_ptr)
    n_hit = tl.zeros([BLOCK], tl.int64)
    for offset in range(0, budget, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        valid = (places < budget) & (places < n_retrieved)
        row = tl.load(rows_ptr + places, mask=valid, other=0)
        n_hit += (tl.load(slots_ptr + row, mask=valid, other=-1) >= 0).to(tl.int64)
    tl.store(hits_ptr, tl.load(hits_ptr) + tl.sum(n_hit, axis=0))
    tl.store(hits_ptr + 1, tl.load(hits_ptr + 1) + n_retrieved.to(tl.int64))
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
    if slots.dim() != 1 or slots.dtype != torch.int32:
        raise ValueError(f"slots must be (n_rows + 1,) int32, got {slots.dtype} {tuple(slots.shape)}.")
    if held.dim() != 1 or rows.dim() != 1 or held.dtype != torch.long or rows.dtype != torch.long:
        raise ValueError(f"held and rows must be 1-D int64, got {held.dtype} {tuple(held.shape)} and {rows.dtype} "
                         f"{tuple(rows.shape)}.")  # fmt: skip
    if rows.numel() > held.numel():
        raise ValueError(f"the cache holds {held.numel()} rows, fewer than the {rows.numel()} retrieved.")
    if count.numel() != 1 or n_retrieved.numel() != 1 or count.dtype != torch.long:
        raise ValueError("count must be one int64 and n_retrieved one integer.")
    if hits.shape != (2,) or hits.dtype != torch.long:
        raise ValueError(f"hits must be (2,) int64, got {hits.dtype} {tuple(hits.shape)}.")
    if any(t.device != slots.device for t in (held, count, rows, n_retrieved, hits)):
        raise ValueError("cache_slots' tensors must be on one device.")


def refresh_slots_triton(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    """The kernel's launch; same contract as refresh_slots."""
    _check_inputs(slots, held, count, rows, n_retrieved, hits)
    _triton_kernels(interpreting())[(1,)](
        slots, held, count, rows, n_retrieved, hits, held.numel(), rows.numel(), BLOCK=_BLOCK, num_warps=4
    )


def refresh_slots_reference(
    slots: torch.Tensor, held: torch.Tensor, count: torch.Tensor, rows: torch.Tensor, n_retrieved: torch.Tensor,
    hits: torch.Tensor,
) -> None:  # fmt: skip
    """Plain torch, in place: masked-out lanes write the scratch entry (the last)."""
    _check_inputs(slots, held, count, rows, n_retrieved, hits)
    scratch = slots.numel() - 1
    places = torch.arange(rows.numel(), device=rows.device)
    retrieved = places < n_retrieved.reshape(1)
    hits[0] += ((slots[torch.where(retrieved, rows, scratch)] >= 0) & retrieved).sum()
    hits[1] += n_retrieved.reshape(())
    was_held = torch.arange(held.numel(), device=held.device) < count.reshape(1)
    slots.index_put_((torch.where(was_held, held, scratch),), torch.tensor(-1, dtype=torch.int32, device=slots.device))
    slots.index_put_((torch.where(retrieved, rows, scratch),), torch.where(retrieved, places, -1).to(torch.int32))
    held[: rows.numel()] = rows
    count.copy_(n_retrieved.reshape(1))


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
