"""The token budget filled from the best votes, and the chosen spans' stored rows, in one launch.

    votes       (n_slots,) float32   each span slot's vote, -inf for spans no query found
    candidates  (m,) int64           the m best votes' slots, ascending (``ltri.topk.first_k_places``), m <= budget
    lengths     (>= n_slots,) int64  each slot's tokens (0 for an empty slot)
    first_rows  (>= n_slots,) int64  each slot's first stored row
    chosen      (m,) int64           the spans taken, ascending, then n_slots as padding
    rows        (budget,) int64      the chosen spans' rows in order, 0 past their count
    count       () int64             how many rows are the chosen spans' (at most budget)

What is taken (``budget_rows_reference``): the candidates by decreasing vote, ties by slot, while the running sum of
their lengths stays within the budget and their votes are finite; their slots in ascending order; then each chosen
span's rows first_rows[s], first_rows[s] + 1, ... one after the other.

Torch ran this as many short launches (two sorts, the cumulative sums, a searchsorted, gathers and wheres), once a
layer in every decode step. Triton, one program: each candidate's (vote, slot) packed into one int64 whose ascending
order is decreasing vote then increasing slot, sorted in registers (``tl.sort``), the lengths' running sum, the chosen
slots sorted again, and each chosen span's rows stored at its running offset (positions past the count set to 0).

CUDA tensors run the kernel, CPU tensors the torch reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_P = 16  # rows per span per store step
_BLOCK_R = 1024  # rows zeroed per step past the count
MAX_CANDIDATES = 4096  # candidates one program sorts in registers; more (a budget of short spans) take the reference


# --------------------------------------------------------------------------------------------- kernel


def _budget_rows_kernel(
    votes_ptr, candidates_ptr, lengths_ptr, first_rows_ptr, chosen_ptr, rows_ptr, count_ptr, m, n_slots, budget,
    M: tl.constexpr, WITH_ROWS: tl.constexpr, MAX_LEN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One program: the budget filled from m candidates, their slots sorted, and (WITH_ROWS) their rows."""
    lanes = tl.arange(0, M)
    valid = lanes < m
    slots = tl.load(candidates_ptr + lanes, mask=valid, other=0).to(tl.int64)
    votes = tl.load(votes_ptr + slots, mask=valid, other=float("-inf")) + 0.0  # -0.0 ties with 0.0, as in torch
    bits = votes.to(tl.int32, bitcast=True)
    ascending = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # the floats' order as int32
    packed = ((~ascending).to(tl.int64) << 32) | slots  # ascending packed: decreasing vote, then increasing slot
    packed = tl.where(valid, packed, 0x7FFFFFFFFFFFFFFF)  # padding lanes last
    ordered = tl.sort(packed)
    slots = ordered & 0xFFFFFFFF
    lengths = tl.load(lengths_ptr + slots, mask=valid, other=0)
    votes = tl.load(votes_ptr + slots, mask=valid, other=float("-inf"))
    fits = valid & (tl.cumsum(lengths, 0) <= budget) & (votes > float("-inf")) & (votes < float("inf"))
    chosen = tl.sort(tl.where(fits, slots, n_slots))
    tl.store(chosen_ptr + lanes, chosen, mask=valid)
    if WITH_ROWS:
        taken = valid & (chosen < n_slots)
        lengths = tl.load(lengths_ptr + chosen, mask=taken, other=0)
        firsts = tl.load(first_rows_ptr + chosen, mask=taken, other=0)
        ends = tl.cumsum(lengths, 0)
        starts = ends - lengths
        count = tl.minimum(tl.max(ends, 0), budget)
        for offset in range(0, MAX_LEN, BLOCK_P):
            steps = offset + tl.arange(0, BLOCK_P)
            at = starts[:, None] + steps[None, :]  # (M, BLOCK_P)
            inside = (steps[None, :] < lengths[:, None]) & (at < budget)
            tl.store(rows_ptr + at, firsts[:, None] + steps[None, :], mask=inside)
        for offset in range(0, budget, BLOCK_R):
            at = offset + tl.arange(0, BLOCK_R)
            tl.store(rows_ptr + at, tl.zeros([BLOCK_R], dtype=tl.int64), mask=(at >= count) & (at < budget))
        tl.store(count_ptr, count.to(tl.int64))


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_budget_rows_kernel, do_not_specialize=["m", "n_slots", "budget"])


# --------------------------------------------------------------------------------------------- launcher


def _check_inputs(
    votes: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, first_rows: torch.Tensor | None, budget: int
) -> None:
    if votes.dim() != 1 or votes.dtype != torch.float32:
        raise ValueError(f"votes must be (n_slots,) float32, got {votes.dtype} {tuple(votes.shape)}.")
    if candidates.dim() != 1 or candidates.dtype != torch.long or candidates.numel() > max(budget, 0):
        raise ValueError(f"candidates must be (m,) int64 with m <= budget ({budget}), got {candidates.dtype} "
                         f"{tuple(candidates.shape)}.")  # fmt: skip
    tables = [lengths] + ([] if first_rows is None else [first_rows])
    if any(t.dim() != 1 or t.dtype != torch.long or t.numel() < votes.numel() for t in tables):
        raise ValueError(f"lengths and first_rows must be int64 tables of at least {votes.numel()} slots.")
    if any(t.device != votes.device for t in (candidates, *tables)):
        raise ValueError("budget_rows' tensors must be on one device.")


def budget_rows_triton(
    votes: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, first_rows: torch.Tensor | None,
    budget: int, max_len: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The kernel's launch; same contract as budget_rows."""
    _check_inputs(votes, candidates, lengths, first_rows, budget)
    m, with_rows = candidates.numel(), first_rows is not None
    chosen = torch.empty(m, dtype=torch.long, device=votes.device)
    rows = torch.empty(budget if with_rows else 0, dtype=torch.long, device=votes.device)
    count = torch.empty((), dtype=torch.long, device=votes.device)
    if m == 0:
        return chosen, rows.zero_() if with_rows else None, count.zero_() if with_rows else None
    _triton_kernels(interpreting())[(1,)](
        votes, candidates, lengths, first_rows if with_rows else lengths, chosen, rows, count, m, votes.numel(), budget,
        M=max(2, 1 << (m - 1).bit_length()), WITH_ROWS=with_rows,
        MAX_LEN=-(-max(max_len, 1) // _BLOCK_P) * _BLOCK_P, BLOCK_P=_BLOCK_P, BLOCK_R=_BLOCK_R, num_warps=8,
    )  # fmt: skip
    return chosen, rows if with_rows else None, count if with_rows else None


# --------------------------------------------------------------------------------------------- reference


def chosen_in_budget(votes: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """Plain torch: the candidates (m,) ascending taken by decreasing vote, ties by slot, while their lengths fit the
    budget and their votes are finite -> (m,) the chosen slots ascending, then n_slots as padding."""
    n_slots = votes.numel()
    order = candidates[torch.argsort(votes[candidates], descending=True, stable=True)]
    fits = (torch.cumsum(lengths[order], dim=0) <= budget) & torch.isfinite(votes[order])
    return torch.sort(torch.where(fits, order, n_slots)).values


def span_token_rows(
    chosen: torch.Tensor, lengths: torch.Tensor, first_rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the stored rows of the chosen spans' tokens, in order, without a host sync.

    chosen (m,) span ids, then padding ids (any id past the last span); lengths, first_rows (n_spans + 1,) each
    span's length and first stored row, the last entry an empty span (length 0) that padding stands for.
    Returns rows (n_rows,) int64, 0 past the chosen tokens, and their count (0-dim int64), at most n_rows.
    """
    chosen = chosen.clamp(max=lengths.numel() - 1)
    chosen_lengths = lengths[chosen]
    ends = torch.cumsum(chosen_lengths, dim=0)  # (m,)
    token = torch.arange(n_rows, device=chosen.device)
    which = torch.searchsorted(ends, token, right=True).clamp(max=chosen.numel() - 1)  # chosen span of each token
    rows = first_rows[chosen[which]] + token - (ends[which] - chosen_lengths[which])
    count = ends[-1].clamp(max=n_rows) if chosen.numel() else torch.zeros((), dtype=torch.long, device=chosen.device)
    return torch.where(token < count, rows, 0), count


def budget_rows_reference(
    votes: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, first_rows: torch.Tensor | None,
    budget: int, max_len: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """Plain torch: chosen_in_budget, then (with first_rows) span_token_rows over the tables' first n_slots + 1
    entries, the padding slot's length taken as 0."""
    _check_inputs(votes, candidates, lengths, first_rows, budget)
    chosen = chosen_in_budget(votes, candidates, lengths, budget)
    if first_rows is None:
        return chosen, None, None
    n_slots, nothing = votes.numel(), lengths.new_zeros(1)  # the padding slot stands for no rows
    padded = [torch.cat([table[:n_slots], nothing]) for table in (lengths, first_rows)]
    rows, count = span_token_rows(chosen, *padded, budget)
    return chosen, rows, count


def budget_rows(
    votes: torch.Tensor, candidates: torch.Tensor, lengths: torch.Tensor, first_rows: torch.Tensor | None,
    budget: int, max_len: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(chosen (m,), rows (budget,), count ()) as the module's docstring says; rows and count None without
    first_rows. max_len: the longest span (lengths at most max_len). The kernel on CUDA (or under
    TRITON_INTERPRET=1) for up to MAX_CANDIDATES candidates, the torch reference otherwise."""
    if candidates.numel() <= MAX_CANDIDATES and use_triton(votes, candidates, lengths):
        return budget_rows_triton(votes, candidates, lengths, first_rows, budget, max_len)
    return budget_rows_reference(votes, candidates, lengths, first_rows, budget, max_len)
