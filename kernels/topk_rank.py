"""Top-k of rows up to a few thousand entries by counting each entry's rank in parallel, in one launch.

    scores  (n_rows, n_keys) float          higher is better (float32, float16 or bfloat16; no NaN)
    n_valid (n_rows,) int                   entries [0, n_valid[r]) of row r are real, the rest padding
    indices (n_rows, k) int64               ascending (document order)

The same contract as ``topk_select`` (ties at the k-th value go to the lowest indices; padding ranks below every
valid entry), by another route. ``topk_select`` gives a row one program, which finds the k-th largest key by a
radix search: its time goes with the instructions each of a few warps runs per entry, on one SM (0.0155 ms for 64
of 4,030 span votes at 128K on an H100, per call in a graph of 8; 0.0107 for 1,024 of 2,048 tokens of 8 KV heads:
``topk`` rows of ``benchmarks/speed/results/attention_h100_08729da.json``). Here a row's entries go BLOCK_I to a
program, over many SMs, and each program counts, for each of its entries, the entries of the row that rank ahead
of it (a larger score, or an equal one at a lower index): that count is the entry's rank, a permutation of
0..n-1, and the entries with rank < k are the top k. The counts take n x n comparisons a row, in parallel, one
comparison and one add each (a block of the row wholly before or after the program's entries needs no index
test: ties there rank ahead, or not, all alike), summed once at the end; the last
program of a row to finish (a ticket, as ``sparse_attention``'s fused merge counts them) then writes the chosen
indices in ascending order at the positions a running prefix sum gives them. Rows longer than RANK_MAX_KEYS stay
with ``topk_select`` (n x n grows: 266 M comparisons for 16K span votes).

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import interpreting
from .sparse_attention import _tickets
from .topk_select import _check_inputs

tl = None  # triton.language, bound by _triton_kernels() on first launch

RANK_MAX_KEYS = 8192  # longest row this kernel takes (topk_tokens sends longer ones to topk_select)
_COMPACT_BLOCK = 4096  # entries the compacting program holds at once


@dataclass(frozen=True)
class RankLaunch:
    """A launch shape: entries a program ranks (block_i), row entries compared at once (block_j), warps."""

    block_i: int = 32
    block_j: int = 256
    num_warps: int = 4


DEFAULT_LAUNCH = RankLaunch()


def _topk_rank_kernel(
    scores_ptr, n_valid_ptr, ranks_ptr, out_ptr, tickets_ptr, n_keys, k, stride_row,
    HAS_VALID: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Ranks of entries [block * BLOCK_I, ...) of one row into ranks (n_rows, n_keys) int32; the row's last program
    to finish writes the entries with rank < k, ascending, into out (n_rows, k)."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    row_scores = scores_ptr + row * stride_row
    valid = n_keys
    if HAS_VALID:
        valid = tl.minimum(tl.load(n_valid_ptr + row).to(tl.int32), n_keys)
    first = block * BLOCK_I
    mine = first + tl.arange(0, BLOCK_I)
    mine_scores = _entry_scores(row_scores, mine, n_keys, valid)[:, None]
    counts = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)  # summed once, after the loop
    for start in range(0, n_keys, BLOCK_J):
        other = start + tl.arange(0, BLOCK_J)
        other_scores = _entry_scores(row_scores, other, n_keys, valid)[None, :]  # beyond the row: -inf, never ahead
        if start + BLOCK_J <= first:  # every other entry precedes mine: a tie ranks ahead
            ahead = other_scores >= mine_scores
        elif start >= first + BLOCK_I:  # every other entry follows mine
            ahead = other_scores > mine_scores
        else:
            ahead = (other_scores > mine_scores) | ((other_scores == mine_scores) & (other[None, :] < mine[:, None]))
        counts += ahead.to(tl.int32)
    tl.store(ranks_ptr + row * n_keys + mine, tl.sum(counts, axis=1), mask=mine < n_keys)

    tl.debug_barrier()  # every thread's ranks are written before the ticket (release) is taken
    ticket = tickets_ptr + row
    if tl.atomic_add(ticket, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        written = tl.zeros([], dtype=tl.int32)
        for start in range(0, n_keys, BLOCK_C):
            index = start + tl.arange(0, BLOCK_C)
            in_row = index < n_keys
            ranks = tl.load(ranks_ptr + row * n_keys + index, mask=in_row, other=k, cache_modifier=".cg")
            take = in_row & (ranks < k)
            slot = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + row * k + slot, index.to(tl.int64), mask=take)
            written += tl.sum(take.to(tl.int32), axis=0)
        tl.atomic_xchg(ticket, 0)  # ready for the next launch


def _entry_scores(row_scores, index, n_keys, valid):
    """float32 scores of entries `index` of a row; padding (index >= valid) and beyond the row at -inf."""
    scores = tl.load(row_scores + index, mask=index < n_keys, other=float("-inf")).to(tl.float32)
    return tl.where(index < valid, scores, float("-inf"))


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _entry_scores
    import triton
    import triton.language

    tl = triton.language
    _entry_scores = triton.jit(_ENTRY_SCORES)  # the kernel calls it by this global name
    return triton.jit(_topk_rank_kernel, do_not_specialize=["n_keys", "k", "stride_row"])


_ENTRY_SCORES = _entry_scores  # the plain function; _triton_kernels binds the name to its JIT wrapper


def takes(scores: torch.Tensor) -> bool:
    """Whether topk_rank_triton can serve these scores: rows of at most RANK_MAX_KEYS entries and a ticket per row
    (none are made during a CUDA graph capture before a launch outside it made the tickets' buffer)."""
    n_rows, n_keys = scores.shape
    return n_keys <= RANK_MAX_KEYS and _tickets(scores.device, n_rows) is not None


def topk_rank_triton(
    scores: torch.Tensor, k: int, n_valid: torch.Tensor | None = None, launch: RankLaunch = DEFAULT_LAUNCH
) -> torch.Tensor:
    """The kernel's launch; same contract as topk_select.topk_tokens, for rows ``takes`` accepts."""
    _check_inputs(scores, k, n_valid)
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    n_rows, n_keys = scores.shape
    out = torch.empty(n_rows, k, dtype=torch.long, device=scores.device)
    if k == 0 or n_rows == 0:
        return out
    if n_keys > RANK_MAX_KEYS:
        raise ValueError(f"topk_rank takes rows of at most {RANK_MAX_KEYS} entries, got {n_keys}.")
    tickets = _tickets(scores.device, n_rows)
    if tickets is None:
        raise ValueError("topk_rank has no tickets here (a first launch inside a CUDA graph capture?).")
    ranks = torch.empty(n_rows, n_keys, dtype=torch.int32, device=scores.device)
    valid = n_valid.to(device=scores.device) if n_valid is not None else None
    _triton_kernels(interpreting())[(n_rows, -(-n_keys // launch.block_i))](
        scores, valid if valid is not None else ranks, ranks, out, tickets, n_keys, k, scores.stride(0),
        HAS_VALID=valid is not None, BLOCK_I=launch.block_i, BLOCK_J=launch.block_j,
        BLOCK_C=min(_COMPACT_BLOCK, max(16, 1 << (n_keys - 1).bit_length())), num_warps=launch.num_warps,
    )  # fmt: skip
    return out
