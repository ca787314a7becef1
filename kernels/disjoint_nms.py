"""Greedy 1-D NMS that keeps no two overlapping spans (nms_iou = 0), every block at once, in one launch.

    grid   (n_blocks, n, n_lengths) float64  score of span [s, s + min_len + j); -inf: no candidate
    picks  (n_blocks, n // min_len, 2) int64 kept spans (start, end), best first; (-1, -1) past a block's last

Greedy NMS keeps the best remaining candidate and drops every candidate overlapping it, until none is left; of
equal scores the first in (start, then length) order wins. ``ltri.spans.greedy_nms`` does that on the flattened
(n_blocks, n x n_lengths) grid: each round reads and masks the whole grid, about eight launches a round and one
round per kept span of the busiest block (19 ms of host time and most of segmentation's 45 ms of GPU time per
2048-token chunk on the H100, ``benchmarks/speed/results/e2e_h100_b97257e_profile_prefill_profile_131072.txt``).

Without overlap the remaining candidates have a simple form. A kept span [a, b) removes every start in [a, b)
and, for a start s < a, every length above a - s. So what remains of start s is its lengths up to
cap(s) = min(limit(s), n) - s, limit(s) being the nearest kept start after s; its best remaining candidate is
the prefix maximum of its scores along lengths, read at cap(s). With the prefix maxima and their first
arguments computed once (``prefix_best``), a round reads one value per start: O(n) instead of O(n x n_lengths).
The kernel runs every round of a block in one program (a block's n starts in one tile), with no host sync; the
torch reference runs the same rounds for all blocks together, a few small operations a round.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

ROUNDS_PER_CHECK = 8  # the reference's rounds between two looks at whether any block has candidates left


def _disjoint_nms_kernel(
    best_ptr, arg_ptr, picks_ptr, n, n_lengths, max_rounds, min_len, max_len,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One block: rounds until no candidate is left; each round keeps the best start's best remaining span."""
    block = tl.program_id(0)
    starts = tl.arange(0, BLOCK)
    alive = starts < n
    limit = tl.zeros([BLOCK], dtype=tl.int32) + n  # the nearest kept start after each start, or n
    rows = block.to(tl.int64) * n * n_lengths + starts.to(tl.int64) * n_lengths  # (BLOCK,) each start's row
    picks_row = picks_ptr + block.to(tl.int64) * max_rounds * 2
    r = 0
    while r < max_rounds:
        cap = tl.minimum(limit - starts, max_len) - min_len  # (BLOCK,) the longest remaining length's index
        usable = alive & (cap >= 0)
        col = tl.where(usable, cap, 0)
        values = tl.load(best_ptr + rows + col, mask=usable, other=float("-inf"))  # (BLOCK,) float64
        top = tl.max(values, axis=0)
        if top > float("-inf"):
            first = tl.min(tl.where(usable & (values == top), starts, BLOCK), axis=0)  # ties: the lowest start
            col_first = tl.sum(tl.where(starts == first, col, 0), axis=0)
            length = tl.load(arg_ptr + block.to(tl.int64) * n * n_lengths + first.to(tl.int64) * n_lengths + col_first)
            end = first + min_len + length
            tl.store(picks_row + 2 * r, first.to(tl.int64))
            tl.store(picks_row + 2 * r + 1, end.to(tl.int64))
            alive = alive & ((starts < first) | (starts >= end))
            limit = tl.where(starts < first, tl.minimum(limit, first), limit)
            r += 1
        else:
            r = max_rounds


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_disjoint_nms_kernel)


def _check_inputs(grid: torch.Tensor, min_len: int) -> None:
    if grid.dim() != 3 or grid.dtype != torch.float64:
        raise ValueError(f"disjoint_nms wants a (n_blocks, n, n_lengths) float64 grid, got {tuple(grid.shape)} "
                         f"{grid.dtype}.")  # fmt: skip
    if min_len < 1:
        raise ValueError(f"min_len must be at least 1, got {min_len}.")


def prefix_best(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per start, the best score over lengths up to each length, and the first (shortest) length index reaching
    it: (n_blocks, n, n_lengths) float64 and int32 (0 where every score so far is -inf)."""
    best = grid.cummax(-1).values
    previous = torch.cat([torch.full_like(best[..., :1], float("-inf")), best[..., :-1]], -1)
    lengths = torch.arange(grid.shape[-1], dtype=torch.int32, device=grid.device)
    arg = torch.where(best > previous, lengths, 0).cummax(-1).values  # where the running best last rose
    return best.contiguous(), arg.contiguous()


def _prepare(grid: torch.Tensor, min_len: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Checked inputs: picks all (-1, -1), and prefix_best(grid), or None when no round can keep a span."""
    _check_inputs(grid, min_len)
    picks = torch.full((grid.shape[0], grid.shape[1] // min_len, 2), -1, dtype=torch.long, device=grid.device)
    if picks.numel() == 0 or grid.shape[2] == 0:
        return picks, None
    return picks, prefix_best(grid)


def disjoint_nms_triton(grid: torch.Tensor, min_len: int) -> torch.Tensor:
    """The kernel's launch; same contract as disjoint_nms."""
    picks, prefix = _prepare(grid, min_len)
    if prefix is None:
        return picks
    (best, arg), (n_blocks, n, n_lengths) = prefix, grid.shape
    block = max(16, _next_pow2(n))
    _triton_kernels(interpreting())[(n_blocks,)](
        best, arg, picks, n, n_lengths, picks.shape[1], min_len, min_len + n_lengths - 1,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return picks


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def disjoint_nms_reference(grid: torch.Tensor, min_len: int) -> torch.Tensor:
    """Plain torch, the kernel's rounds for all blocks together (a look at whether any block has candidates left
    every ROUNDS_PER_CHECK rounds)."""
    picks, prefix = _prepare(grid, min_len)
    if prefix is None:
        return picks
    (best, arg), (n_blocks, n, n_lengths) = prefix, grid.shape
    starts = torch.arange(n, device=grid.device).expand(n_blocks, n)
    alive = torch.ones(n_blocks, n, dtype=torch.bool, device=grid.device)
    limit = torch.full((n_blocks, n), n, dtype=torch.long, device=grid.device)
    max_len = min_len + n_lengths - 1
    for r in range(picks.shape[1]):
        cap = (limit - starts).clamp(max=max_len) - min_len  # (n_blocks, n)
        usable = alive & (cap >= 0)
        col = cap.clamp(min=0)[..., None]
        values = best.gather(-1, col).squeeze(-1).masked_fill(~usable, float("-inf"))
        top, first = values.max(-1, keepdim=True)  # (n_blocks, 1): the first best start
        found = top > float("-inf")
        end = first + min_len + arg.gather(-1, col).squeeze(-1).gather(-1, first)
        picks[:, r] = torch.where(found, torch.cat([first, end], -1), -1)
        alive &= ~found | (starts < first) | (starts >= end)
        limit = torch.where(found & (starts < first), torch.minimum(limit, first), limit)
        if (r + 1) % ROUNDS_PER_CHECK == 0 and not bool(found.any()):
            break
    return picks


def disjoint_nms(grid: torch.Tensor, min_len: int) -> torch.Tensor:
    """Greedy NMS with no overlap, every block at once (see the module's docstring): picks (n_blocks, n // min_len,
    2) int64. The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(grid):
        return disjoint_nms_triton(grid, min_len)
    return disjoint_nms_reference(grid, min_len)
