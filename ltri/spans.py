"""Span segmentation ("triangles", DESIGN.md, The method, point 2).

A chunk's causal self-attention block A (n, n) (row i: query i over keys j <= i, averaged over heads,
rows summing to 1) shows local triangles: runs of tokens that attend mostly to each other. A candidate
span [x, y] scores S(x, y) = sum_{x <= j <= i <= y} (A_ij - theta_i); candidates of min_len..max_len
tokens with S > 0 go through greedy 1-D non-maximum suppression, the tokens between the kept spans are
filled with spans, and every token of the block ends up in exactly one span.
Vocabulary: n tokens in the block, n_blocks blocks, n_spans spans, n_cand candidates, window = max_len.
The thresholds, score tables, candidates and greedy NMS run on the attention's device, for many
blocks of one size at once (leading block dimension; one NMS round serves every block; without overlap,
the default, all rounds of every block are one kernel launch: ltri.kernels.disjoint_nms). Claiming tokens
among overlapping kept spans and filling the gaps between them run on the host, on small integer tensors,
for all blocks together, with one short loop (one step per gap shorter than min_len).

Sinks. A column that rows far from it (beyond any span's reach) still attend to heavily is an
attention sink (the first token, some punctuation or frequent words). ``sink_columns`` finds them and
the default threshold leaves them out of its statistics (S itself keeps every cell: leaving sinks out
of S too was measured worse, it loses the first triangle of a block to noise).

Default threshold (theta=None), per row: theta_i = g(u_i) * typical_i, where
- typical_i is the attention-weighted typical value of row i: the value v such that the keys with
  A_ij >= v hold TYPICAL_MASS (60%) of the row's attention within its last ``window`` keys (sinks
  left out). It is the share of a key that row i really attends to, unmoved by a few spikes (the
  diagonal, the previous token) below 40% of the mass and by a long thin background.
- g = TRIANGLE_C (0.7) for a row with structure: a key counts for the row when it gets at least 70%
  of that typical share. Inside a triangle of t keys a row's typical share is ~1/t, so every cell of
  the triangle clears theta and every cell outside (background) falls below it, at any triangle
  length: greedy NMS over S then picks whole triangles rather than unions or halves of them.
- u_i = 1 / (typical_i * keys_i) compares the typical share with the uniform share over all the
  row's keys (sinks left out): u ~ 1 means the row spreads its attention over its whole past, which
  is no evidence of a triangle. g rises linearly from TRIANGLE_C at u = UNIFORM_FROM (0.8) to
  1 + UNIFORM_MARGIN (1.1) at u = 1, so uniform rows count slightly against every span: an
  all-uniform block has no triangle and is cut by gap filling only.
Why not a fixed theta or c / (i + 1) (the uniform share): the raw value of a triangle cell is ~1/t
(t: the triangle's length so far), not ~1/(i + 1), so both are tied to one triangle length and
position: early rows clear any fixed theta; c / (i + 1) never sees an early triangle (its rows look
uniform) and lets late short triangles merge in pairs. Measured on planted 512-token matrices
(lengths 8..128; sinks, decaying background, diagonal and previous-token spikes, log-normal noise;
16 seeds per setting): this rule found 99-100% of the boundaries within +-1 (99-100% exactly) at
95-99% precision in six of seven settings, 86% at 84% precision in the weakest (local share 35%);
fixed theta (0.02, 0.04) and c / (i + 1) (c = 3, 5) found 72-98% at 15-67% precision.
On real head-averaged SmolLM2-135M attention (two 512-token blocks of an essay, 7 layers) triangles
are faint: this rule's spans hold 1.06-1.97x the in-span attention of as many equal spans, c / (i + 1)
with c = 3 slightly more (1.08-2.15x). End-to-end retrieval should decide; theta is a parameter.
The first triangle of a block (its rows attend to their whole past, as uniform rows do) is found
either as a triangle or as the gap before the second one; a block without structure gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ltri.kernels.disjoint_nms import disjoint_nms

TRIANGLE_C = 0.7
TYPICAL_MASS = 0.6
UNIFORM_FROM = 0.8
UNIFORM_MARGIN = 0.1
SINK_SHARE = 8.0
BISECTION_STEPS = 10


@dataclass(frozen=True)
class Segmentation:
    """Spans covering tokens 0..n-1 of a block exactly once, in order."""

    starts: Tensor  # (n_spans,) int64, ascending
    ends: Tensor  # (n_spans,) int64, exclusive; ends[k] == starts[k + 1]
    scores: Tensor  # (n_spans,) float32 triangle score S of each span
    from_triangles: Tensor  # (n_spans,) bool: kept by NMS (True, possibly grown by a short gap) or gap filling

    @property
    def lengths(self) -> Tensor:
        return self.ends - self.starts  # (n_spans,)

    @property
    def n_spans(self) -> int:
        return self.starts.numel()


@dataclass(frozen=True)
class TriangleScores:
    """S of any span in O(1) from a 2-D prefix-sum table per block (float64, so long sums stay exact enough).

    With M_ij = A_ij - theta_i for j <= i (0 above the diagonal) and
    P[a, b] = sum_{i < a, j < b} M_ij, table[..., b, a] = P[a, b] (stored transposed: column-wise cumsum
    is the slow one on the CPU).
    """

    table: Tensor  # (..., n + 1, n + 1) float64, indexed [block..., column bound, row bound]

    def __call__(self, starts: Tensor, ends: Tensor) -> Tensor:
        """S of the spans [starts, ends) (int64, any shapes that broadcast) in every block -> float64
        (..., *span shape).

        Rows i < x hold nothing in columns j >= x (causal), so the square [x, y) x [x, y) is the
        triangle and its prefix-sum difference has two terms: S = P[y, y] - P[y, x].
        """
        return self.table[..., ends, ends] - self.table[..., starts, ends]

    def of_blocks(self, blocks: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
        """S of span k [starts[k], ends[k]) in block blocks[k] of a (n_blocks, n + 1, n + 1) table: int64
        tensors that broadcast -> float64 (same arithmetic as __call__)."""
        return self.table[blocks, ends, ends] - self.table[blocks, starts, ends]


def sink_columns(attention: Tensor, reach: int) -> Tensor:
    """(..., n) bool: columns j that rows at distance >= reach from j give, on average, at least SINK_SHARE
    times their uniform share 1 / (i + 1). attention (..., n, n): leading dimensions are blocks.
    reach is clipped to n // 2 so short blocks still look."""
    n = attention.shape[-1]
    reach = max(min(reach, n // 2), 1)
    rows = torch.arange(n, device=attention.device)
    far = (rows[:, None] - rows[None, :]) >= reach  # (n, n)
    relative = attention.float() * (rows[:, None] + 1)  # (..., n, n) share relative to uniform
    n_far = far.sum(0)  # (n,)
    mean = (relative * far).sum(-2) / n_far.clamp(min=1)  # (..., n)
    return (n_far > 0) & (mean >= SINK_SHARE)


def _band(attention: Tensor, window: int) -> Tensor:
    """band[..., i, d] = A[..., i, i - d] for d < window (0 where i - d < 0): (..., n, n) -> (..., n, window)."""
    n = attention.shape[-1]
    rows = torch.arange(n, device=attention.device)[:, None]
    cols = rows - torch.arange(window, device=attention.device)  # (n, window)
    index = cols.clamp(min=0).expand(*attention.shape[:-2], n, window)
    return attention.gather(-1, index) * (cols >= 0)


def typical_attention(attention: Tensor, window: int, sinks: Tensor) -> Tensor:
    """(..., n) per row: the largest v such that the keys with A_ij >= v hold TYPICAL_MASS of the row's
    attention over its last ``window`` keys, sinks left out (0 for a row with nothing left).
    attention (..., n, n), sinks (..., n): leading dimensions are blocks.

    Geometric bisection: the keys below v hold less than v * window, so v lies in
    [(1 - TYPICAL_MASS) * mass / window, row max], a ratio of at most window / (1 - TYPICAL_MASS);
    BISECTION_STEPS halvings of its logarithm pin v to well under 1%."""
    a = attention.float().masked_fill(sinks[..., None, :], 0.0)
    window = min(window, a.shape[-1])
    band = _band(a, window)  # (..., n, window)
    mass = band.sum(-1, keepdim=True)  # (..., n, 1)
    low = ((1 - TYPICAL_MASS) * mass / window).clamp(min=1e-30)
    high = band.amax(-1, keepdim=True).clamp(min=1e-30)
    for _ in range(BISECTION_STEPS):
        mid = (low * high).sqrt()
        enough = torch.where(band >= mid, band, 0.0).sum(-1, keepdim=True) >= TYPICAL_MASS * mass
        low, high = torch.where(enough, mid, low), torch.where(enough, high, mid)
    return torch.where(mass > 0, low, 0.0).squeeze(-1)


def default_theta(attention: Tensor, window: int = 128) -> Tensor:
    """Per-row thresholds theta_i = g(u_i) * typical_i (see the module docstring): (..., n, n) -> (..., n).

    window: keys a row looks back over for its typical share, and the reach beyond which attention
    to a column marks it a sink (segment passes max_len)."""
    sinks = sink_columns(attention, window)
    typical = typical_attention(attention, window, sinks)  # (..., n)
    keys = (~sinks).long().cumsum(-1)  # (..., n) non-sink keys j <= i
    uniformity = 1.0 / (typical * keys).clamp(min=1e-30)
    ramp = ((uniformity - UNIFORM_FROM) / (1 - UNIFORM_FROM)).clamp(0, 1)
    factor = TRIANGLE_C + (1 + UNIFORM_MARGIN - TRIANGLE_C) * ramp
    return factor * typical


def row_thresholds(attention: Tensor, theta: float | Tensor | None, window: int = 128) -> Tensor:
    """theta as one float64 value per row, (..., n): None -> default_theta, float -> constant,
    a tensor of shape (..., n) -> itself."""
    rows = attention.shape[:-1]
    if theta is None:
        return default_theta(attention, window).double()
    if isinstance(theta, Tensor):
        if theta.shape != rows:
            raise ValueError(f"a per-row theta needs shape {tuple(rows)}, got {tuple(theta.shape)}")
        return theta.to(attention.device, torch.float64)
    return torch.full(rows, float(theta), dtype=torch.float64, device=attention.device)


def triangle_scores(attention: Tensor, theta: float | Tensor | None = None, window: int = 128) -> TriangleScores:
    """Prefix sums of (A_ij - theta_i) over j <= i: attention (..., n, n) -> TriangleScores, one table
    per block of the leading dimensions.

    theta: float, (..., n) per row, or None for default_theta(attention, window)."""
    if attention.dim() < 2 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be square (n, n) blocks, got {tuple(attention.shape)}")
    n = attention.shape[-1]
    thresholds = row_thresholds(attention, theta, window)  # (..., n)
    # in place from here: for a batch of blocks these are large (32 blocks of 1024 tokens: 270 MB each)
    excess = attention.to(torch.float64, copy=True).sub_(thresholds[..., None]).tril_()  # (..., n, n)
    table = excess.new_zeros(*attention.shape[:-2], n + 1, n + 1)
    # [..., j, i]: sum over rows <= i, columns <= j
    table[..., 1:, 1:] = excess.cumsum_(-1).transpose(-1, -2).contiguous().cumsum_(-1)
    return TriangleScores(table)


@dataclass(frozen=True)
class Candidates:
    """Candidate spans, at the same positions in every block, in (start, then length) order, with their
    scores per block. Positions are float64 (exact) so that the NMS arithmetic stays in float64."""

    starts: Tensor  # (n_cand,) float64
    ends: Tensor  # (n_cand,) float64, exclusive
    scores: Tensor  # (n_blocks, n_cand) float64 S > 0; -inf where the span is no candidate of that block


def candidate_grid(scores: TriangleScores, n: int, min_len: int, max_len: int) -> Candidates:
    """Every span [start, start + length) with min_len <= length <= max_len, dense and without a device
    sync: n * n_lengths candidates, the score -inf where the span leaves the block or S <= 0.
    scores: tables (n_blocks, n + 1, n + 1)."""
    device = scores.table.device
    lengths = torch.arange(min_len, max(min(max_len, n), min_len - 1) + 1, device=device)  # (n_lengths,)
    starts = torch.arange(n, device=device)[:, None].expand(n, lengths.numel())  # (n, n_lengths)
    ends = starts + lengths
    s = scores(starts, ends.clamp(max=n))  # (n_blocks, n, n_lengths)
    s = s.masked_fill((ends > n) | ~(s > 0), float("-inf"))
    return Candidates(starts.flatten().double(), ends.flatten().double(), s.flatten(-2))


def positive_candidates(candidates: Candidates) -> Candidates:
    """The candidates of at least one block, in the same order (fewer for NMS to go through; a device sync)."""
    kept = (candidates.scores > float("-inf")).any(0).nonzero().squeeze(1)  # (n_kept,)
    return Candidates(candidates.starts[kept], candidates.ends[kept], candidates.scores[:, kept])


NMS_ROUNDS_PER_CHECK = 8  # NMS rounds enqueued between two looks at whether candidates remain (device syncs)


@dataclass(frozen=True)
class _NmsBuffers:
    """What every NMS round reuses (allocating its (n_blocks, n_cand) temporaries afresh each round fragments
    the CPU heap: it grew by gigabytes over thousands of rounds)."""

    drop: Tensor  # (n_blocks, n_cand) bool
    other: Tensor  # (n_blocks, n_cand) bool
    overlap: Tensor  # (n_blocks, n_cand) float64 (nms_iou > 0; else empty)
    union: Tensor  # (n_blocks, n_cand) float64 (nms_iou > 0; else empty)
    lengths: Tensor  # (n_cand,) float64 candidate lengths

    @staticmethod
    def like(candidates: Candidates, nms_iou: float) -> _NmsBuffers:
        scores = candidates.scores
        masks = [torch.empty_like(scores, dtype=torch.bool) for _ in range(2)]
        sums = [torch.empty_like(scores) if nms_iou > 0 else scores.new_empty(0) for _ in range(2)]
        return _NmsBuffers(*masks, *sums, candidates.ends - candidates.starts)


def _drop_overlapping(
    live: Tensor, candidates: Candidates, best_start: Tensor, best_end: Tensor, nms_iou: float, buffers: _NmsBuffers
) -> None:
    """Set to -inf, in live (n_blocks, n_cand), the candidates whose IoU with their block's pick
    (best_start, best_end: (n_blocks, 1)) exceeds nms_iou, the pick included."""
    starts, ends, drop = candidates.starts, candidates.ends, buffers.drop
    if nms_iou == 0:  # IoU > 0: any overlap (what the general test below says, in fewer operations)
        torch.lt(starts, best_end, out=drop)
        drop &= torch.gt(ends, best_start, out=buffers.other)
    else:
        overlap, union = buffers.overlap, buffers.union
        torch.minimum(ends, best_end, out=overlap).sub_(torch.maximum(starts, best_start, out=union)).clamp_(min=0)
        torch.add(buffers.lengths, best_end - best_start, out=union).sub_(overlap)
        torch.gt(overlap, union.mul_(nms_iou), out=drop)  # IoU > nms_iou, without dividing
    live.masked_fill_(drop, float("-inf"))


def greedy_nms(candidates: Candidates, nms_iou: float) -> Tensor:
    """Greedy 1-D NMS in every block at once: the best remaining candidate is kept and every candidate
    whose IoU with it exceeds nms_iou is dropped. Returns picks (n_blocks, n_rounds, 2) int64
    (start, end), best first, (-1, -1) for none. One round per kept span of the block with the most
    (at most n / min_len when nms_iou is 0); of equal scores the first candidate (lower start, then
    shorter) wins.

    Each round handles every block and stays on the device: a block with no candidate left records
    an invalid pick. The device is asked whether any block has candidates left only every
    NMS_ROUNDS_PER_CHECK rounds."""
    live = candidates.scores.clone()  # (n_blocks, n_cand): S > 0, or -inf once dropped (or never a candidate)
    buffers = _NmsBuffers.like(candidates, nms_iou)
    picks, best_scores = [], []
    while live.numel() and bool(live.max() > float("-inf")):
        for _ in range(NMS_ROUNDS_PER_CHECK):
            best_score, best = live.max(-1, keepdim=True)  # (n_blocks, 1) each, the first best
            best_start, best_end = candidates.starts[best], candidates.ends[best]
            picks.append(torch.cat([best_start, best_end], -1))
            best_scores.append(best_score)
            _drop_overlapping(live, candidates, best_start, best_end, nms_iou, buffers)
    if not picks:
        return torch.full((live.shape[0], 0, 2), -1, dtype=torch.long, device=live.device)
    valid = torch.cat(best_scores, -1) > float("-inf")  # (n_blocks, n_rounds)
    return torch.where(valid[..., None], torch.stack(picks, 1), -1.0).long()


@dataclass(frozen=True)
class BlockSpans:
    """Spans of many blocks, flat: span k is [starts[k], ends[k]) of block blocks[k]. (n_spans,) int64 each."""

    blocks: Tensor
    starts: Tensor
    ends: Tensor

    def select(self, which: Tensor) -> BlockSpans:
        return BlockSpans(self.blocks[which], self.starts[which], self.ends[which])

    def __add__(self, other: BlockSpans) -> BlockSpans:
        """These spans, then other's."""
        return BlockSpans(*(torch.cat(pair) for pair in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.blocks, self.starts, self.ends


def _first_owner(picks: Tensor, n: int) -> Tensor:
    """(n_blocks, n) int64: per token, the first (best) pick covering it, -1 for none.
    picks: (n_blocks, n_rounds, 2) (start, end), (-1, -1) covers nothing."""
    if picks.shape[1] == 0 or n == 0:
        return torch.full((picks.shape[0], n), -1, dtype=torch.long, device=picks.device)
    owner = _owner_of_disjoint(picks, n)
    return owner if owner is not None else _owner_by_cover(picks, n)


def _running_marks(starts: Tensor, ends: Tensor, marks: Tensor, n: int) -> Tensor:
    """(n_blocks, n): per token the sum of the marks (n_blocks, n_rounds) of the picks [start, end) covering it,
    by adding each mark at its pick's start, taking it back at its end and summing along the block."""
    running = torch.zeros(starts.shape[0], n + 1, dtype=torch.long, device=starts.device)
    running.scatter_add_(1, starts, marks).scatter_add_(1, ends, -marks)
    return running.cumsum_(1)[:, :n]


def _owner_of_disjoint(picks: Tensor, n: int) -> Tensor | None:
    """_first_owner for picks that never share a token (what NMS keeps with nms_iou = 0), in O(n_blocks x (n +
    n_rounds)) rather than the dense cover's O(n_blocks x n_rounds x n); None when some token has two picks.
    On 32 blocks of 2048 tokens the dense cover was 54 ms of each prefill chunk's host time on the H100 machine
    (``claim_tokens`` in ``benchmarks/speed/results/e2e_h100_7e52b02_profile_prefill_profile_131072.txt``)."""
    valid = picks[..., 0] >= 0  # (n_blocks, n_rounds)
    starts, ends = (torch.where(valid, picks[..., side], 0) for side in (0, 1))
    if bool((_running_marks(starts, ends, valid.long(), n) > 1).any()):
        return None
    rounds = torch.arange(1, picks.shape[1] + 1, device=picks.device).expand_as(starts)
    return _running_marks(starts, ends, rounds * valid, n) - 1  # the covering pick + 1, 0 for none


def _owner_by_cover(picks: Tensor, n: int) -> Tensor:
    """_first_owner for any picks, overlapping ones too: every pick's cover of every token, (n_blocks, n_rounds,
    n), and the first pick covering each token."""
    tokens = torch.arange(n, device=picks.device)
    cover = (tokens >= picks[..., :1]) & (tokens < picks[..., 1:])  # (n_blocks, n_rounds, n)
    return torch.where(cover.any(1), cover.int().argmax(1), -1)


def claim_tokens(picks: Tensor, n: int, min_len: int) -> BlockSpans:
    """Kept spans (picks (n_blocks, n_rounds, 2), best first, (-1, -1) for none) made disjoint: a token
    belongs to the best span covering it; what a span keeps is cut into runs, and runs shorter than
    min_len are given up (left to gap filling). With nms_iou=0 the spans are already disjoint and come
    back unchanged. Returns the runs by block, then start. Small integer work: meant for the host."""
    owner = _first_owner(picks, n)  # (n_blocks, n)
    change = torch.ones_like(owner, dtype=torch.bool)
    change[:, 1:] = owner[:, 1:] != owner[:, :-1]
    blocks, run_starts = change.nonzero().unbind(1)  # (n_runs,) each, by block then start
    next_in_block = torch.cat([blocks[1:] == blocks[:-1], blocks.new_zeros(1, dtype=torch.bool)])
    run_ends = torch.where(next_in_block, run_starts.roll(-1), n)
    keep = (owner[blocks, run_starts] >= 0) & (run_ends - run_starts >= min_len)
    return BlockSpans(blocks[keep], run_starts[keep], run_ends[keep])


@dataclass(frozen=True)
class Gaps:
    """The stretches between kept spans (BlockSpans, by block then start) in every block, in order:
    n_kept + n_blocks of them, some empty. Gap m lies between kept spans left[m] and right[m] (-1: the
    block's edge); kept span k has gap k + blocks[k] before it and the next one after it."""

    spans: BlockSpans
    left: Tensor  # (n_gaps,) int64
    right: Tensor  # (n_gaps,) int64

    @property
    def sizes(self) -> Tensor:
        return self.spans.ends - self.spans.starts  # (n_gaps,)


def gaps_between(kept: BlockSpans, n_blocks: int, n: int) -> Gaps:
    """Gaps of n_blocks blocks of n tokens around their disjoint kept spans (by block, then start)."""
    index = torch.arange(kept.blocks.numel())
    first_in_block = torch.ones_like(kept.blocks, dtype=torch.bool)
    first_in_block[1:] = kept.blocks[1:] != kept.blocks[:-1]
    left = torch.where(first_in_block, -1, index - 1)  # left of the gap before each kept span
    counts = torch.bincount(kept.blocks, minlength=n_blocks)  # (n_blocks,)
    last = torch.where(counts > 0, counts.cumsum(0) - 1, -1)  # each block's last kept span: left of its last gap
    ends_or_zero = torch.cat([kept.ends, kept.ends.new_zeros(1)])  # [-1] -> 0, the block's first token
    blocks, lefts = torch.cat([kept.blocks, torch.arange(n_blocks)]), torch.cat([left, last])
    order = torch.argsort(blocks, stable=True)  # each block's gaps before its kept spans, then its last gap
    spans = BlockSpans(blocks, ends_or_zero[lefts], torch.cat([kept.starts, torch.full((n_blocks,), n)]))
    return Gaps(spans.select(order), lefts[order], torch.cat([index, torch.full((n_blocks,), -1)])[order])


def _left_gains_more(scores: TriangleScores, kept: BlockSpans, gaps: Gaps, between: Tensor) -> list[bool]:
    """For the gaps ``between`` (indices of gaps with kept spans on both sides): does the left neighbour's S
    gain at least as much from the gap as the right one's? Computed on the scores' device, one sync."""
    left, right = gaps.left[between], gaps.right[between]
    blocks, starts, ends = gaps.spans.select(between).fields()
    blocks, starts, ends, left_starts, right_ends = torch.stack(
        [blocks, starts, ends, kept.starts[left], kept.ends[right]]
    ).to(scores.table.device, non_blocking=True)
    gain_left = scores.of_blocks(blocks, left_starts, ends) - scores.of_blocks(blocks, left_starts, starts)
    gain_right = scores.of_blocks(blocks, starts, right_ends) - scores.of_blocks(blocks, ends, right_ends)
    return (gain_left >= gain_right).tolist()


def _place_short_gaps(
    sizes: list[int],
    lengths: list[int],
    left: list[int],
    right: list[int],
    prefer_left: list[bool],
    min_len: int,
    max_len: int,
) -> tuple[list[int], list[int]]:
    """Decide, gap after gap, where each gap shorter than min_len goes: gap m lies between kept spans
    left[m] and right[m] (-1: none; lengths, grown as gaps join them). A short gap goes whole to its
    preferred neighbour if that one has the room, else whole to the other one, else it is split between
    them when their rooms add up; otherwise it stays a span of its own. Returns tokens given left and
    right per gap. A loop over the gaps on host integers."""
    to_left, to_right = [0] * len(sizes), [0] * len(sizes)
    for m, gap in enumerate(sizes):
        if not 0 < gap < min_len:
            continue
        room_left = max_len - lengths[left[m]] if left[m] >= 0 else 0
        room_right = max_len - lengths[right[m]] if right[m] >= 0 else 0
        fits_left, fits_right = gap <= room_left, gap <= room_right
        if fits_left and (prefer_left[m] or not fits_right):
            to_left[m] = gap
        elif fits_right:
            to_right[m] = gap
        elif room_left + room_right >= gap:
            to_left[m], to_right[m] = room_left, gap - room_left
        if left[m] >= 0:
            lengths[left[m]] += to_left[m]
        if right[m] >= 0:
            lengths[right[m]] += to_right[m]
    return to_left, to_right


def _merge_short_gaps(
    scores: TriangleScores, kept: BlockSpans, gaps: Gaps, min_len: int, max_len: int
) -> tuple[BlockSpans, Tensor]:
    """Give the gaps shorter than min_len to neighbouring kept spans where the room allows.

    The preferred neighbour is the one whose S gains more from the gap. kept, gaps: on the host.
    Returns the kept spans grown and merged (n_gaps,) bool: which gaps were absorbed."""
    sizes = gaps.sizes
    short = (sizes > 0) & (sizes < min_len)
    if not bool(short.any()):
        return kept, torch.zeros_like(short)
    has_left, has_right = gaps.left >= 0, gaps.right >= 0
    prefer_left = has_left & ~has_right
    between = (short & has_left & has_right).nonzero().squeeze(1)
    if between.numel():
        prefer_left[between] = torch.tensor(_left_gains_more(scores, kept, gaps, between))
    to_left, to_right = _place_short_gaps(
        sizes.tolist(),
        (kept.ends - kept.starts).tolist(),
        gaps.left.tolist(),
        gaps.right.tolist(),
        prefer_left.tolist(),
        min_len,
        max_len,
    )
    to_left, to_right = sizes.new_tensor(to_left), sizes.new_tensor(to_right)  # (n_gaps,)
    before = torch.arange(kept.blocks.numel()) + kept.blocks  # (n_kept,) the gap before each kept span
    grown = BlockSpans(kept.blocks, kept.starts - to_right[before], kept.ends + to_left[before + 1])
    return grown, short & (to_left + to_right == sizes)


def split_gaps(gaps: BlockSpans, max_len: int) -> BlockSpans:
    """Cut each gap (sizes >= 1) into ceil(size / max_len) near-equal pieces (sizes differ by at most 1)."""
    size = gaps.ends - gaps.starts
    pieces = (size + max_len - 1) // max_len  # (n_gaps,)
    gap = torch.repeat_interleave(torch.arange(size.numel(), device=size.device), pieces)  # (n_pieces,)
    first_piece = torch.cumsum(pieces, 0) - pieces
    k = torch.arange(gap.numel(), device=size.device) - first_piece[gap]  # piece index within its gap
    base, extra = size[gap] // pieces[gap], size[gap] % pieces[gap]
    starts = gaps.starts[gap] + k * base + torch.minimum(k, extra)
    return BlockSpans(gaps.blocks[gap], starts, starts + base + (k < extra).long())


def _segmentations(scores: TriangleScores, spans: BlockSpans, from_triangles: Tensor, n: int) -> list[Segmentation]:
    """Host spans of every block (any order) -> one Segmentation per block on the scores' device, its
    spans sorted by start and scored there."""
    n_blocks = scores.table.shape[0]
    order = torch.argsort(spans.blocks * (n + 1) + spans.starts)
    counts = torch.bincount(spans.blocks, minlength=n_blocks).tolist()
    rows = torch.stack([spans.blocks, spans.starts, spans.ends, from_triangles.long()])[:, order]
    blocks, starts, ends, kept = rows.to(scores.table.device, non_blocking=True)
    span_scores = scores.of_blocks(blocks, starts, ends).float()
    parts = (part.split(counts) for part in (starts, ends, span_scores, kept.bool()))
    return [Segmentation(*fields) for fields in zip(*parts, strict=True)]


def fill_gaps(scores: TriangleScores, kept: BlockSpans, n: int, min_len: int, max_len: int) -> list[Segmentation]:
    """Cover the tokens no kept span holds in every block: scores (n_blocks, n + 1, n + 1) tables on the
    device, kept: disjoint kept spans on the host (by block, then start) -> one Segmentation per block."""
    n_blocks = scores.table.shape[0]
    gaps = gaps_between(kept, n_blocks, n)
    grown, merged = _merge_short_gaps(scores, kept, gaps, min_len, max_len)
    pieces = split_gaps(gaps.spans.select((gaps.sizes > 0) & ~merged), max_len)
    from_triangles = torch.cat(
        [torch.ones_like(grown.starts, dtype=torch.bool), torch.zeros_like(pieces.starts, dtype=torch.bool)]
    )
    return _segmentations(scores, grown + pieces, from_triangles, n)


def check_bounds(min_len: int, max_len: int, nms_iou: float) -> None:
    """Refuse span bounds the segmentation cannot keep (see segment)."""
    if not 1 <= min_len <= max_len or max_len < 2 * min_len - 1:
        raise ValueError(f"need 1 <= min_len and max_len >= 2 * min_len - 1, got {min_len} and {max_len}")
    if not 0 <= nms_iou < 1:
        raise ValueError(f"nms_iou must be in [0, 1), got {nms_iou}")


def segment_blocks(
    attention: Tensor,
    theta: float | Tensor | None,
    min_len: int,
    max_len: int,
    nms_iou: float,
    dense: bool,
) -> list[Segmentation]:
    """segment for each block of attention (n_blocks, n, n) at once (theta: float, (n_blocks, n) or None).

    dense: NMS goes through every (start, length) candidate of every block, with no device sync to find
    the positive ones; otherwise only through those positive in some block (fewer, one sync). Same
    result either way. Device syncs: one per NMS_ROUNDS_PER_CHECK rounds, one bringing the kept spans
    to the host, one for the gains of short gaps (when any); claiming tokens and filling gaps runs on
    the host, for all blocks together."""
    check_bounds(min_len, max_len, nms_iou)
    if attention.dim() != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be (n_blocks, n, n), got {tuple(attention.shape)}")
    n_blocks, n = attention.shape[:2]
    if n_blocks == 0:
        return []
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=attention.device)
        return [Segmentation(empty, empty, empty.float(), empty.bool()) for _ in range(n_blocks)]
    scores = triangle_scores(attention, theta, max_len)  # (n_blocks, n + 1, n + 1) tables
    picks = kept_spans(candidate_grid(scores, n, min_len, max_len), n, min_len, nms_iou, dense)
    return fill_gaps(scores, claim_tokens(picks, n, min_len), n, min_len, max_len)


def kept_spans(candidates: Candidates, n: int, min_len: int, nms_iou: float, dense: bool) -> Tensor:
    """Greedy NMS of the dense grid's candidates, on the host: picks (n_blocks, n_rounds, 2) int64, best first,
    (-1, -1) for none (the kept spans' sync). Without overlap (nms_iou = 0) ``disjoint_nms``'s rounds of O(n);
    otherwise greedy_nms's rounds over every candidate (only those positive in some block unless dense)."""
    if nms_iou == 0:
        grid = candidates.scores.view(candidates.scores.shape[0], n, -1)  # (n_blocks, n, n_lengths)
        picks = disjoint_nms(grid, min_len).cpu()
        rounds = (picks[..., 0] >= 0).sum(1)  # (n_blocks,) kept spans of each block
        return picks[:, : int(rounds.max()) if rounds.numel() else 0]
    if not dense:
        candidates = positive_candidates(candidates)
    return greedy_nms(candidates, nms_iou).cpu()


def segment(
    attention: Tensor,
    theta: float | Tensor | None = None,
    min_len: int = 8,
    max_len: int = 128,
    nms_iou: float = 0.0,
) -> Segmentation:
    """Cut a block of n tokens into spans from its causal attention (n, n), on the attention's device.

    theta: a float, a (n,) per-row tensor, or None for default_theta (window max_len).
    nms_iou: overlap allowed between kept candidates, in [0, 1); where kept spans overlap, each token
        goes to the best one and what a span keeps of itself is cut into runs (runs shorter than
        min_len are left to gap filling).
    Gap filling: a gap of min_len or more tokens becomes ceil(size / max_len) near-equal spans; a
    shorter one joins the neighbouring kept span whose S gains more from it (or the one with room),
    or is split between both neighbours when neither has room for all of it.
    Every span has min_len..max_len tokens, except when unavoidable: the block itself is shorter than
    min_len (one span); or a gap shorter than min_len whose neighbours together lack the room to take
    it within max_len (it stays a span of its own).
    Needs max_len >= 2 * min_len - 1, so that any gap of min_len or more splits into pieces within the
    bounds. Many blocks of one size at once: ltri.span_batch.segment_many.
    """
    if attention.dim() != 2 or attention.shape[0] != attention.shape[1]:
        raise ValueError(f"attention must be a square (n, n) block, got {tuple(attention.shape)}")
    if isinstance(theta, Tensor):
        theta = theta[None]
    return segment_blocks(attention[None], theta, min_len, max_len, nms_iou, dense=False)[0]
