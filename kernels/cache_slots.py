"""The row cache's slots after a decode step: the rows the step retrieved join the ones the cache holds, in the
segment of its oldest step (``ltri.offload.row_cache``), in one launch.

    slots        (n_rows + 1,) int32   each stored row's place in the cache, -1 for none; the last entry is scratch
    held         (S, C) int64          the rows each of the cache's S segments holds, at their places (the first
                                       counts[s] valid); place p of segment s is row s * C + p of the cache's rows
    counts       (S,) int64            how many each segment holds
    turn         (1,) int64            the segment this step fills: the one of the oldest step held
    rows         (B,) int64            the step's retrieved rows, distinct, the first n_retrieved valid (B <= C)
    n_retrieved  () or (1,) int64
    hits         (2,) int64            running sums: retrieved rows the cache held before the call, rows retrieved

After the call, with t = turn before it: hits[0] += the valid rows whose slot was set before the call, hits[1] +=
n_retrieved; slots[held[t, j]] = -1 for j < counts[t] where that slot lay in segment t (a row retrieved again since
lies in a newer segment, and keeps that place); then slots[rows[i]] = t * C + i for i < n_retrieved; held[t, :B] =
rows; counts[t] = n_retrieved; turn = (t + 1) % S. (A row held before and retrieved again gets its new place.) Every
tensor stays on the device and keeps its address: a captured step's graph calls this every step.

The kernel is one program: it counts the retrieved rows already held, clears segment t's places, waits for every
thread (a barrier orders the block's global writes), then writes the new ones. The torch reference sends masked-out
lanes to the scratch entry (no boolean indexing, no host sync). CUDA tensors run the kernel, CPU tensors the
reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK = 1024  # rows a loop step


def _cache_slots_kernel(
    slots_ptr, held_ptr, counts_ptr, turn_ptr, rows_ptr, n_retrieved_ptr, hits_ptr, n_segments, capacity, budget,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program: the retrieved rows already held counted, segment turn's slots cleared, a barrier, the retrieved
    rows' slots set in segment turn and held there, turn advanced."""
    n_retrieved = tl.load(n_retrieved_ptr)
    turn = tl.load(turn_ptr)
    n_hit = tl.zeros([BLOCK], tl.int64)
    for offset in range(0, budget, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        valid = (places < budget) & (places < n_retrieved)
        row = tl.load(rows_ptr + places, mask=valid, other=0)
        n_hit += (tl.load(slots_ptr + row, mask=valid, other=-1) >= 0).to(tl.int64)
    tl.store(hits_ptr, tl.load(hits_ptr) + tl.sum(n_hit, axis=0))
    tl.store(hits_ptr + 1, tl.load(hits_ptr + 1) + n_retrieved.to(tl.int64))
    tl.debug_barrier()
    segment_start = turn * capacity
    old_count = tl.load(counts_ptr + turn)
    for offset in range(0, capacity, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        was_held = (places < old_count) & (places < capacity)
        row = tl.load(held_ptr + segment_start + places, mask=was_held, other=0)
        slot = tl.load(slots_ptr + row, mask=was_held, other=-1)
        still_here = was_held & (slot >= segment_start) & (slot < segment_start + capacity)
        tl.store(slots_ptr + row, tl.full([BLOCK], -1, tl.int32), mask=still_here)
    tl.debug_barrier()
    for offset in range(0, budget, BLOCK):
        places = offset + tl.arange(0, BLOCK)
        listed = places < budget
        row = tl.load(rows_ptr + places, mask=listed, other=0)
        tl.store(slots_ptr + row, (segment_start + places).to(tl.int32), mask=listed & (places < n_retrieved))
        tl.store(held_ptr + segment_start + places, row, mask=listed)
    tl.store(counts_ptr + turn, n_retrieved.to(tl.int64))
    tl.store(turn_ptr, (turn + 1) % n_segments)


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_cache_slots_kernel)


def _check_inputs(
    slots: torch.Tensor, held: torch.Tensor, counts: torch.Tensor, turn: torch.Tensor, rows: torch.Tensor,
    n_retrieved: torch.Tensor, hits: torch.Tensor,
) -> None:  # fmt: skip
    if slots.dim() != 1 or slots.dtype != torch.int32:
        raise ValueError(f"slots must be (n_rows + 1,) int32, got {slots.dtype} {tuple(slots.shape)}.")
    if held.dim() != 2 or rows.dim() != 1 or held.dtype != torch.long or rows.dtype != torch.long:
        raise ValueError(f"held must be (S, C) and rows (B,), both int64, got {held.dtype} {tuple(held.shape)} and "
                         f"{rows.dtype} {tuple(rows.shape)}.")  # fmt: skip
    if not held.is_contiguous():
        raise ValueError("held must be contiguous.")
    if rows.numel() > held.shape[1]:
        raise ValueError(f"the cache holds {held.shape[1]} rows a step, fewer than the {rows.numel()} retrieved.")
    if counts.shape != (held.shape[0],) or counts.dtype != torch.long:
        raise ValueError(f"counts must be ({held.shape[0]},) int64, a count a segment.")
    if turn.shape != (1,) or turn.dtype != torch.long or n_retrieved.numel() != 1:
        raise ValueError("turn must be one int64 and n_retrieved one integer.")
    if hits.shape != (2,) or hits.dtype != torch.long:
        raise ValueError(f"hits must be (2,) int64, got {hits.dtype} {tuple(hits.shape)}.")
    if any(t.device != slots.device for t in (held, counts, turn, rows, n_retrieved, hits)):
        raise ValueError("cache_slots' tensors must be on one device.")


def refresh_slots_triton(
    slots: torch.Tensor, held: torch.Tensor, counts: torch.Tensor, turn: torch.Tensor, rows: torch.Tensor,
    n_retrieved: torch.Tensor, hits: torch.Tensor,
) -> None:  # fmt: skip
    """The kernel's launch; same contract as refresh_slots."""
    _check_inputs(slots, held, counts, turn, rows, n_retrieved, hits)
    _triton_kernels(interpreting())[(1,)](
        slots, held, counts, turn, rows, n_retrieved, hits, held.shape[0], held.shape[1], rows.numel(),
        BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip


def refresh_slots_reference(
    slots: torch.Tensor, held: torch.Tensor, counts: torch.Tensor, turn: torch.Tensor, rows: torch.Tensor,
    n_retrieved: torch.Tensor, hits: torch.Tensor,
) -> None:  # fmt: skip
    """Plain torch, in place: masked-out lanes write the scratch entry (the last)."""
    _check_inputs(slots, held, counts, turn, rows, n_retrieved, hits)
    scratch, capacity = slots.numel() - 1, held.shape[1]
    places = torch.arange(rows.numel(), device=rows.device)
    retrieved = places < n_retrieved.reshape(1)
    hits[0] += ((slots[torch.where(retrieved, rows, scratch)] >= 0) & retrieved).sum()
    hits[1] += n_retrieved.reshape(())
    segment_rows = held.index_select(0, turn)[0]  # (C,) the rows segment turn held
    segment_start = turn * capacity
    was_held = torch.arange(capacity, device=held.device) < counts.index_select(0, turn)
    slot = slots[torch.where(was_held, segment_rows, scratch)].long()
    still_here = was_held & (slot >= segment_start) & (slot < segment_start + capacity)
    slots.index_put_((torch.where(still_here, segment_rows, scratch),), torch.tensor(-1, dtype=torch.int32,
                                                                                     device=slots.device))  # fmt: skip
    new_slots = torch.where(retrieved, segment_start + places, -1).to(torch.int32)
    slots.index_put_((torch.where(retrieved, rows, scratch),), new_slots)
    segment = torch.zeros(capacity, dtype=torch.long, device=held.device)
    segment[: rows.numel()] = rows
    segment[rows.numel() :] = segment_rows[rows.numel() :]
    held.index_copy_(0, turn, segment[None])
    counts.index_copy_(0, turn, n_retrieved.reshape(1).to(torch.long))
    turn.copy_((turn + 1) % held.shape[0])


def refresh_slots(
    slots: torch.Tensor, held: torch.Tensor, counts: torch.Tensor, turn: torch.Tensor, rows: torch.Tensor,
    n_retrieved: torch.Tensor, hits: torch.Tensor,
) -> None:  # fmt: skip
    """The cache's slots, held rows, counts and turn after a step that retrieved rows (see the module's docstring),
    in place. The kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(slots, held, counts, turn, rows, n_retrieved, hits):
        refresh_slots_triton(slots, held, counts, turn, rows, n_retrieved, hits)
    else:
        refresh_slots_reference(slots, held, counts, turn, rows, n_retrieved, hits)
