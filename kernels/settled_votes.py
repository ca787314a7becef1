"""A layer's span votes from the index's results, in three launches: pooled, shared between layers, persisted.

    scores, span_ids  (nheads_kv, n_ask, k)   what each query found: its k spans' scores, ids -1 past what it found
    votes             (n_slots,) float32      each span slot's vote, -inf for spans no query found

What is computed, in this order (``settled_votes_reference``, the torch reference, spells it out):

    pool       each query's softmax (of scores * scale) over the spans it found, pooled per span over all queries:
               the mean over the queries (``how="mean"``) or the largest weight (``how="max"``); -inf where none found
    shared     (``SharedArgs``) the span's borrowed vote, the largest of previous + current over its positions (at least
               0), is read; then the span's pooled vote / n_layers (0 where -inf) is added to current at each of its
               positions; where borrowed > 0 the vote becomes (pooled, 0 where -inf) + borrowed * collaboration
    persisted  (``PersistArgs``: remembered, a (>= n_slots,) buffer) with decay > 0 the vote is raised to
               remembered * decay where that is positive; with record, remembered then holds max(vote, 0) (0 where -inf)

Span s covers positions first + first_rows[s] onwards for lengths[s] <= max_len tokens; the stored spans tile the
positions (``ltri.span_tables``), so the shared buffers' reads and writes of one span touch only its own positions.

Torch ran this as many short launches (the softmax, the scatters, the read, the gather by each row's owner, the
wheres); the decode step does it once a layer, so those launches were a large share of a captured step's time
(``benchmarks/speed/NOTES.md``, step 38). Triton: one memset of the pool, a pool kernel (one program a block of
queries: the softmax in registers, then atomic max or add of each weight, and an atomic count, into the pool), and a
settle kernel (one program a block of spans: the pooled vote, the shared read and publish over the span's positions,
persistence), which writes the votes. Atomic adds make the "mean" pool's sums order-dependent in their last bits, as
torch's index_add on CUDA is; "max" is exact.

CUDA tensors run the kernels, CPU tensors the torch reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import interpreting, use_triton
from .span_max import span_max

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_Q = 16  # queries per pool program
MAX_K = 1024  # results a query holds in one pool program's registers; more take the reference
# spans per settle program, positions per span per loop step. A (32, 128) tile, every position of a span of the
# default max_len loaded at once, took 19.1 us a layer on the H100 against 9.4 for these (NOTES.md step 39).
_BLOCK_S = 128
_BLOCK_P = 16


@dataclass(frozen=True)
class SharedArgs:
    """The shared votes a layer reads and publishes (``ltri.shared_votes``): buffers (n_positions,) float32 with room
    for first + n_rows positions, updated in place; the span tables (first_rows, lengths (>= n_slots,) int64, owner
    (n_rows,) int64, each row's span: the reference publishes through it)."""

    previous: torch.Tensor
    current: torch.Tensor
    first: int
    first_rows: torch.Tensor
    lengths: torch.Tensor
    owner: torch.Tensor
    max_len: int
    n_layers: int
    collaboration: float


@dataclass(frozen=True)
class PersistArgs:
    """Persistence's remembered votes (>= n_slots,) float32, updated in place with record (``ltri.retrieval``), and
    its decay (0: the remembered votes are not applied)."""

    remembered: torch.Tensor
    decay: float
    record: bool = True


# --------------------------------------------------------------------------------------------- kernels


def _pool_kernel(
    scores_ptr, ids_ptr, pool_ptr, hits_ptr, n_queries, k, n_slots, scale, mean_weight,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, MEAN: tl.constexpr,
):  # fmt: skip
    """BLOCK_Q queries' softmax over what each found, each weight pooled into its span's slot (atomic max, or add of
    weight * mean_weight), and a count of the queries that found the span."""
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    at = queries.to(tl.int64)[:, None] * k + cols[None, :]
    inside = (queries < n_queries)[:, None] & (cols < k)[None, :]
    ids = tl.load(ids_ptr + at, mask=inside, other=-1)
    found = inside & (ids >= 0) & (ids < n_slots)
    logits = tl.where(found, tl.load(scores_ptr + at, mask=found, other=0.0).to(tl.float32) * scale, float("-inf"))
    top = tl.max(logits, axis=1)
    weights = tl.where(found, tl.exp(logits - tl.where(top == float("-inf"), 0.0, top)[:, None]), 0.0)
    total = tl.sum(tl.sort(weights, dim=1), axis=1)  # summed in sorted order: the same whatever order the k came in
    weights = weights / tl.where(total > 0.0, total, 1.0)[:, None]
    slots = tl.where(found, ids, 0)
    if MEAN:
        tl.atomic_add(pool_ptr + slots, weights * mean_weight, mask=found, sem="relaxed")
    else:
        tl.atomic_max(pool_ptr + slots, weights, mask=found, sem="relaxed")
    tl.atomic_add(hits_ptr + slots, tl.full([BLOCK_Q, BLOCK_K], 1.0, tl.float32), mask=found, sem="relaxed")


def _settle_kernel(
    pool_ptr, hits_ptr, votes_ptr, previous_ptr, current_ptr, first_rows_ptr, lengths_ptr, remembered_ptr,
    n_slots, first, n_positions, inv_layers, collaboration, decay,
    SHARED: tl.constexpr, PERSIST: tl.constexpr, RECORD: tl.constexpr,
    MAX_LEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """BLOCK_S span slots: the pooled vote (-inf where no query found the span), the shared votes' read and publish
    over each span's positions, persistence; writes the votes (and the remembered ones)."""
    spans = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    span_ok = spans < n_slots
    pooled = tl.load(pool_ptr + spans, mask=span_ok, other=0.0)
    hits = tl.load(hits_ptr + spans, mask=span_ok, other=0.0)
    votes = tl.where(hits > 0.0, pooled, float("-inf"))
    if SHARED:
        found = tl.where(hits > 0.0, pooled, 0.0)  # a vote of -inf publishes and adds 0
        starts = first + tl.load(first_rows_ptr + spans, mask=span_ok, other=0)
        lengths = tl.load(lengths_ptr + spans, mask=span_ok, other=0)
        published = found * inv_layers
        borrowed = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for offset in range(0, MAX_LEN, BLOCK_P):
            steps = offset + tl.arange(0, BLOCK_P)
            positions = starts[:, None] + steps[None, :]  # (BLOCK_S, BLOCK_P)
            inside = span_ok[:, None] & (steps[None, :] < lengths[:, None]) & (positions < n_positions)
            current = tl.load(current_ptr + positions, mask=inside, other=0.0)
            shared = tl.load(previous_ptr + positions, mask=inside, other=0.0) + current
            borrowed = tl.maximum(borrowed, tl.max(tl.where(inside, shared, 0.0), axis=1))
            tl.store(current_ptr + positions, current + published[:, None], mask=inside)
        votes = tl.where(borrowed > 0.0, found + borrowed * collaboration, votes)
    if PERSIST:
        faded = tl.load(remembered_ptr + spans, mask=span_ok, other=0.0) * decay
        votes = tl.where(faded > 0.0, tl.maximum(votes, faded), votes)
    if RECORD:
        tl.store(remembered_ptr + spans, tl.maximum(tl.where(votes > float("-inf"), votes, 0.0), 0.0), mask=span_ok)
    tl.store(votes_ptr + spans, votes, mask=span_ok)


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrappers of the kernels above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    # counts that change as spans are stored and steps go by: no specialisation (no recompile as they change class)
    return (
        triton.jit(_pool_kernel, do_not_specialize=["n_queries", "n_slots"]),
        triton.jit(_settle_kernel, do_not_specialize=["n_slots", "first", "n_positions"]),
    )


# --------------------------------------------------------------------------------------------- launcher


def _check_inputs(
    scores: torch.Tensor, span_ids: torch.Tensor, n_slots: int, how: str, shared: SharedArgs | None,
    persist: PersistArgs | None,
) -> None:  # fmt: skip
    if scores.dim() != 3 or span_ids.shape != scores.shape:
        raise ValueError(f"settled_votes wants scores and span_ids (nheads_kv, n_ask, k), got {tuple(scores.shape)} "
                         f"and {tuple(span_ids.shape)}.")  # fmt: skip
    if span_ids.dtype not in (torch.int32, torch.int64) or not scores.is_floating_point():
        raise ValueError(f"span_ids must be int32/int64 and scores floating, got {span_ids.dtype}, {scores.dtype}.")
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'mean' or 'max', got {how!r}.")
    tensors = [span_ids]
    if shared is not None:
        tensors += [shared.previous, shared.current, shared.first_rows, shared.lengths, shared.owner]
        if shared.previous.shape != shared.current.shape or shared.previous.dtype != torch.float32:
            raise ValueError("the shared votes' buffers must be two float32 tensors of one shape.")
        if min(shared.first_rows.numel(), shared.lengths.numel()) < n_slots:
            raise ValueError(f"the span tables must cover the {n_slots} slots voted on.")
        if shared.previous.numel() < shared.first + shared.owner.numel():
            raise ValueError(f"the shared votes need room for {shared.first + shared.owner.numel()} positions, "
                             f"they have {shared.previous.numel()}.")  # fmt: skip
    if persist is not None:
        remembered = persist.remembered
        tensors.append(remembered)
        if remembered.dim() != 1 or remembered.dtype != torch.float32 or remembered.numel() < n_slots:
            raise ValueError(f"remembered must be a float32 buffer of at least {n_slots} votes, got "
                             f"{remembered.dtype} {tuple(remembered.shape)}.")  # fmt: skip
    if any(t.device != scores.device for t in tensors):
        raise ValueError("settled_votes' tensors must be on one device.")


def settled_votes_triton(
    scores: torch.Tensor, span_ids: torch.Tensor, n_slots: int, scale: float, how: str = "mean",
    shared: SharedArgs | None = None, persist: PersistArgs | None = None,
) -> torch.Tensor:  # fmt: skip
    """The kernels' launches; same contract as settled_votes."""
    _check_inputs(scores, span_ids, n_slots, how, shared, persist)
    votes = torch.empty(n_slots, dtype=torch.float32, device=scores.device)
    if n_slots == 0:
        return votes
    pool = torch.zeros(2, n_slots, dtype=torch.float32, device=scores.device)  # pooled weights, queries that found
    n_queries, k = scores.shape[0] * scores.shape[1], scores.shape[2]
    pool_kernel, settle_kernel = _triton_kernels(interpreting())
    if n_queries and k:
        pool_kernel[(-(-n_queries // _BLOCK_Q),)](
            scores, span_ids, pool[0], pool[1], n_queries, k, n_slots, float(scale), 1.0 / n_queries,
            BLOCK_Q=_BLOCK_Q, BLOCK_K=max(2, 1 << (k - 1).bit_length()), MEAN=how == "mean",
        )  # fmt: skip
    remembered = persist.remembered if persist else votes  # unread when persistence is off
    previous, current, first_rows, lengths = (
        (shared.previous, shared.current, shared.first_rows, shared.lengths) if shared else (votes,) * 4
    )
    settle_kernel[(-(-n_slots // _BLOCK_S),)](
        pool[0], pool[1], votes, previous, current, first_rows, lengths, remembered,
        n_slots, shared.first if shared else 0, previous.numel(), 1.0 / shared.n_layers if shared else 0.0,
        float(shared.collaboration) if shared else 0.0, float(persist.decay) if persist else 0.0,
        SHARED=shared is not None, PERSIST=bool(persist and persist.decay > 0), RECORD=bool(persist and persist.record),
        MAX_LEN=-(-max(shared.max_len if shared else 1, 1) // _BLOCK_P) * _BLOCK_P, BLOCK_S=_BLOCK_S,
        BLOCK_P=_BLOCK_P,
    )  # fmt: skip
    return votes


# --------------------------------------------------------------------------------------------- reference


def pool_votes(
    scores: torch.Tensor, span_ids: torch.Tensor, n_spans: int, scale: float, how: str = "mean"
) -> torch.Tensor:
    """Each query's softmax over the spans it found, pooled per span over all queries.

    scores, span_ids: (nheads_kv, n_ask, k), ids -1 where a query found fewer than k spans.
    how: ``mean`` averages the weights over the queries (a span many queries lean towards wins);
    ``max`` takes each span's largest weight (a span one query is sure of wins: retrieval heads are few,
    and their sharp choices would drown in the flat ones of the other heads).
    Returns votes (n_spans,) float32; spans no head found get -inf (so that a vote of 0 after
    underflow still counts as found).
    """
    found = span_ids >= 0
    weights = query_softmax(scores, found, scale)
    n_queries = scores.shape[0] * scores.shape[1]
    # Spans not found go to one extra slot, dropped at the end: no boolean indexing, no device sync.
    slots = torch.where(found, span_ids, n_spans).flatten()
    votes = torch.zeros(n_spans + 1, dtype=torch.float32, device=scores.device)
    if how == "max":
        votes.scatter_reduce_(0, slots, weights.flatten(), "amax")
    else:
        votes.index_add_(0, slots, weights.flatten() / n_queries)
    hits = torch.zeros_like(votes).index_add_(0, slots, found.flatten().float())
    return votes[:n_spans].masked_fill(hits[:n_spans] == 0, float("-inf"))


def query_softmax(scores: torch.Tensor, found: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query's softmax of scores * scale over what it found (..., k), 0 elsewhere and for a query that found
    nothing. Its sum is taken in sorted order, so a query's weights do not depend on the order its results come in
    (the captured search leaves them unsorted), as the pool kernel's do not."""
    logits = torch.where(found, scores.float() * scale, float("-inf"))
    top = logits.amax(dim=-1, keepdim=True)
    exps = torch.where(found, (logits - torch.where(top == float("-inf"), 0.0, top)).exp(), 0.0)
    total = exps.sort(dim=-1).values.sum(dim=-1, keepdim=True)
    return exps / torch.where(total > 0.0, total, 1.0)


def found_or_zero(votes: torch.Tensor) -> torch.Tensor:
    """votes with -inf (not found) as 0."""
    return torch.where(torch.isfinite(votes), votes, 0.0)


def publish_votes(current: torch.Tensor, first: int, owner: torch.Tensor, votes: torch.Tensor, n_layers: int) -> None:
    """Add each row's span's vote / n_layers (0 where -inf) to current at the rows' positions (from first on)."""
    per_token = (found_or_zero(votes) / n_layers)[owner]
    current[first : first + per_token.numel()] += per_token


def with_borrowed(votes: torch.Tensor, borrowed: torch.Tensor, collaboration: float) -> torch.Tensor:
    """votes raised by what other layers published (borrowed > 0): found votes + borrowed * collaboration."""
    return torch.where(borrowed > 0, found_or_zero(votes) + borrowed * collaboration, votes)


def faded_votes(votes: torch.Tensor, remembered: torch.Tensor, decay: float) -> torch.Tensor:
    """votes raised to the remembered ones (>= n,) times decay, where those are positive."""
    faded = remembered[: votes.numel()] * decay
    return torch.where(faded > 0, torch.maximum(votes, faded), votes)


def votes_to_remember(votes: torch.Tensor) -> torch.Tensor:
    """What persistence keeps of votes: max(vote, 0), 0 where -inf."""
    return found_or_zero(votes).clamp(min=0)


def settled_votes_reference(
    scores: torch.Tensor, span_ids: torch.Tensor, n_slots: int, scale: float, how: str = "mean",
    shared: SharedArgs | None = None, persist: PersistArgs | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain torch: the module docstring's steps in order (the shared buffers and remembered updated in place)."""
    _check_inputs(scores, span_ids, n_slots, how, shared, persist)
    votes = pool_votes(scores, span_ids, n_slots, scale, how)
    if shared is not None:
        first_rows, lengths = shared.first_rows[:n_slots], shared.lengths[:n_slots]
        borrowed = span_max(shared.previous, shared.current, shared.first, first_rows, lengths, shared.max_len)
        publish_votes(shared.current, shared.first, shared.owner, votes, shared.n_layers)
        votes = with_borrowed(votes, borrowed, shared.collaboration)
    if persist is not None and persist.decay > 0:
        votes = faded_votes(votes, persist.remembered, persist.decay)
    if persist is not None and persist.record:
        persist.remembered[:n_slots] = votes_to_remember(votes)
    return votes


def settled_votes(
    scores: torch.Tensor, span_ids: torch.Tensor, n_slots: int, scale: float, how: str = "mean",
    shared: SharedArgs | None = None, persist: PersistArgs | None = None,
) -> torch.Tensor:  # fmt: skip
    """(n_slots,) float32 votes of span slots from the index's results (see the module's docstring).

    scale multiplies the scores before each query's softmax; how: "mean" or "max" pooling; shared: the shared votes
    to read and publish (None: not shared); persist: persistence's buffer, its decay, and whether the settled votes
    are remembered (None: no persistence). The kernels on CUDA (or under TRITON_INTERPRET=1) for up to MAX_K results a
    query, the torch reference otherwise."""
    tensors = [scores, span_ids, *([shared.previous] if shared else []), *([persist.remembered] if persist else [])]
    if scores.shape[-1] <= MAX_K and use_triton(*tensors):
        return settled_votes_triton(scores, span_ids, n_slots, scale, how, shared, persist)
    return settled_votes_reference(scores, span_ids, n_slots, scale, how, shared, persist)
