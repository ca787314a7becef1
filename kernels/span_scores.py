"""Span scores: each query's largest score over each span's index vectors, in one pass over the vectors.

    queries   (nheads_kv, n_queries, dim)    a decode step's or a question's queries, grouped by KV head
    vectors   (nheads_kv, capacity, dim)     the index's vectors, any float dtype; each span's are consecutive
    first     (n_table,) int64               each span slot's first vector
    count     (n_table,) int64               each span slot's number of vectors (0: no span there yet)
    n_valid   0-dim int64 on the device      vectors at or past it are left out (a captured step's count)
    scores    (nheads_kv, n_queries, n_slots) float32, -inf for a slot with no vector left in (slots past
              n_table included)

The index's span score is the largest inner product between a query and any of the span's vectors. Scoring
every vector and then taking each span's maximum with a scatter (``ltri.index.base.best_spans``) wrote and
reread the vector scores and collided in its atomics on each span's run of vectors: 39 us a layer at 128K
tokens of context on the H100, on top of the scores' own 22 us (benchmarks/speed/NOTES.md step 7). Where the
index keeps each span's vectors together, as SpanMemory adds them, the kernel reads each span's vectors (at
most max_vectors, padded to a power of two), scores them for the group's queries with one tensor-core dot
and keeps the maximum: the vectors are read once, no vector score is written.

CUDA tensors run the kernel, CPU tensors the torch reference, unless TRITON_INTERPRET=1 (then the interpreter
runs the kernel, in float32 for half-precision inputs, whose tl.dot it lacks).
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton
from .vector_scores import check_inputs, check_kernel_vectors, vector_scores_reference

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_Q = 16  # tl.dot needs at least 16 rows
_ROWS = 128  # vectors a program scores at once: ROWS // per_span spans
_ROWS_FLOAT32, _WARPS_FLOAT32 = 32, 8  # float32's exact dot: smaller tiles on more warps (register spills)
MAX_VECTORS = _ROWS_FLOAT32  # the most vectors of one span the kernel takes, whatever the dtype


def _span_scores_kernel(
    q_ptr, v_ptr, first_ptr, count_ptr, n_valid_ptr, out_ptr, n_queries, n_slots, n_table,
    stride_qh, stride_qn, stride_vh, stride_vn, stride_oh, stride_on,
    DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, PER_SPAN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of queries against the vectors of BLOCK_S span slots of one KV head."""
    head = tl.program_id(0)
    span_block = tl.program_id(1)
    query_block = tl.program_id(2)
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rows = tl.arange(0, BLOCK_S * PER_SPAN)  # row r: the (r % PER_SPAN)-th vector of slot r // PER_SPAN
    slots = span_block * BLOCK_S + rows // PER_SPAN
    nth = rows % PER_SPAN
    in_table = slots < n_table
    first = tl.load(first_ptr + slots, mask=in_table, other=0)
    count = tl.load(count_ptr + slots, mask=in_table, other=0)
    vectors = first + nth
    n_valid = tl.load(n_valid_ptr)
    v_ok = in_table & (nth < count) & (vectors < n_valid)
    dims = tl.arange(0, DIM)
    q_ok = queries < n_queries
    q_off = head.to(tl.int64) * stride_qh + queries[:, None].to(tl.int64) * stride_qn + dims[None, :]
    v_off = head.to(tl.int64) * stride_vh + vectors[:, None].to(tl.int64) * stride_vn + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=q_ok[:, None], other=0.0)
    v = tl.load(v_ptr + v_off, mask=v_ok[:, None], other=0.0)
    if UPCAST:
        q, v = q.to(tl.float32), v.to(tl.float32)
    scores = tl.dot(q, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_S * PER_SPAN) float32
    scores = tl.where(v_ok[None, :], scores, float("-inf"))
    best = tl.max(tl.reshape(scores, (BLOCK_Q, BLOCK_S, PER_SPAN)), axis=2)  # (BLOCK_Q, BLOCK_S)
    out_slots = span_block * BLOCK_S + tl.arange(0, BLOCK_S)
    o_off = head.to(tl.int64) * stride_oh + queries[:, None].to(tl.int64) * stride_on + out_slots[None, :]
    tl.store(out_ptr + o_off, best, mask=q_ok[:, None] & (out_slots < n_slots)[None, :])


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    # The counts change as spans are stored: specialising on them (divisible by 16, equal to 1) would compile the
    # kernel anew in the middle of decoding whenever one changes class.
    return triton.jit(_span_scores_kernel, do_not_specialize=["n_queries", "n_slots", "n_table"])


def per_span_rows(max_vectors: int) -> int:
    """The vector rows the kernel reads per span slot: max_vectors rounded up to a power of two (at least 1)."""
    return 1 << max(max_vectors - 1, 0).bit_length()


def _check_tables(vectors: torch.Tensor, first: torch.Tensor, count: torch.Tensor, n_valid: torch.Tensor) -> None:
    if first.shape != count.shape or first.dim() != 1:
        raise ValueError(f"first and count must be (n_table,), got {tuple(first.shape)} and {tuple(count.shape)}.")
    if first.dtype != torch.long or count.dtype != torch.long or n_valid.dtype != torch.long:
        raise ValueError("first, count and n_valid must be int64.")
    if n_valid.numel() != 1:
        raise ValueError(f"n_valid must hold one count, got shape {tuple(n_valid.shape)}.")
    if any(t.device != vectors.device for t in (first, count, n_valid)):
        raise ValueError("first, count and n_valid must be on the vectors' device.")


def span_scores_triton(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    n_valid: torch.Tensor,
    n_slots: int,
    max_vectors: int,
) -> torch.Tensor:
    """The kernel's launch; same contract as span_scores."""
    check_inputs(queries, vectors)
    check_kernel_vectors(vectors, "span scores")
    _check_tables(vectors, first, count, n_valid)
    dim = vectors.shape[2]
    per_span = per_span_rows(max_vectors)
    exact = interpreting() or vectors.dtype == torch.float32
    rows, warps = (_ROWS_FLOAT32, _WARPS_FLOAT32) if vectors.dtype == torch.float32 else (_ROWS, 4)
    if max_vectors > MAX_VECTORS:
        raise ValueError(f"The span scores kernel reads at most {MAX_VECTORS} vectors per span, got {max_vectors}.")
    queries = queries.to(vectors.dtype).contiguous()
    nheads_kv, n_queries, _ = queries.shape
    out = torch.empty(nheads_kv, n_queries, n_slots, dtype=torch.float32, device=vectors.device)
    if n_queries == 0 or n_slots == 0:
        return out
    block_s = rows // per_span
    grid = (nheads_kv, -(-n_slots // block_s), -(-n_queries // _BLOCK_Q))
    _triton_kernels(interpreting())[grid](
        queries, vectors, first, count, n_valid.reshape(1), out, n_queries, n_slots, first.numel(),
        queries.stride(0), queries.stride(1), vectors.stride(0), vectors.stride(1), out.stride(0), out.stride(1),
        DIM=dim, BLOCK_Q=_BLOCK_Q, BLOCK_S=block_s, PER_SPAN=per_span, UPCAST=exact,
        DOT_PRECISION="ieee" if exact else "tf32", num_warps=warps,
    )  # fmt: skip
    return out


def span_scores_reference(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    n_valid: torch.Tensor,
    n_slots: int,
    max_vectors: int,
) -> torch.Tensor:
    """Plain torch: every vector's score (vector_scores_reference), then each slot's maximum over its vectors."""
    check_inputs(queries, vectors)
    _check_tables(vectors, first, count, n_valid)
    nheads_kv, n_queries, _ = queries.shape
    capacity = vectors.shape[1]
    if capacity == 0 or first.numel() == 0:
        return torch.full((nheads_kv, n_queries, n_slots), float("-inf"), device=vectors.device)
    scores = vector_scores_reference(queries, vectors).float()  # (nheads_kv, n_queries, capacity)
    slots = torch.arange(n_slots, device=vectors.device)
    table = slots.clamp(max=first.numel() - 1)
    nth = torch.arange(max(max_vectors, 1), device=vectors.device)
    rows = first[table][:, None] + nth  # (n_slots, per_span)
    ok = (slots < first.numel())[:, None] & (nth < count[table][:, None]) & (rows < n_valid) & (rows < capacity)
    gathered = scores[:, :, rows.clamp(0, capacity - 1)]  # (nheads_kv, n_queries, n_slots, per_span)
    return gathered.masked_fill(~ok, float("-inf")).amax(dim=3)


def span_scores(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    first: torch.Tensor,
    count: torch.Tensor,
    n_valid: torch.Tensor,
    n_slots: int,
    max_vectors: int,
) -> torch.Tensor:
    """Each query's best score over each span slot's vectors: (nheads_kv, n_queries, n_slots) float32, -inf for
    slots without a vector (see the module's docstring for the shapes). max_vectors: at least every count.
    The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(queries, vectors):
        return span_scores_triton(queries, vectors, first, count, n_valid, n_slots, max_vectors)
    return span_scores_reference(queries, vectors, first, count, n_valid, n_slots, max_vectors)
