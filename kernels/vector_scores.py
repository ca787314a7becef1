"""Span index scores: every query of a KV head against every index vector of that head, in float32.

    queries  (nheads_kv, n_queries, dim)   a decode step's or a question's queries, grouped by KV head
    vectors  (nheads_kv, n_vectors, dim)   the index's vectors, any float dtype (bf16 on CUDA: the model's keys)
    scores   (nheads_kv, n_queries, n_vectors) float32

The span index reads all its vectors at every decode step, so this is a memory-bound product with a tiny
left side (4 queries per head for Llama-3-8B's GQA groups). torch's bmm with a float32 output from bf16
inputs ran as cuBLAS's magma sgemmEx kernel on the H100: 125 us a layer at 128K tokens of context
(benchmarks/speed/NOTES.md step 7), several times the time to read the vectors once. The Triton kernel
reads each block of vectors once for all queries of its block (tensor-core dot, float32 accumulation).
Queries are cast to the vectors' dtype first, as the bmm did. CUDA tensors run the kernel, CPU tensors the
torch reference, unless TRITON_INTERPRET=1 (then the interpreter runs the kernel, in float32 for
half-precision inputs, whose tl.dot it lacks).
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_Q = 16  # tl.dot needs at least 16 rows
_BLOCK_V = 128
# float32's exact (non-tensor-core) dot takes smaller tiles on more warps, as in sparse_attention (register spills)
_BLOCK_V_FLOAT32, _WARPS_FLOAT32 = 32, 8


def _scores_kernel(
    q_ptr, v_ptr, out_ptr, n_queries, n_vectors,
    stride_qh, stride_qn, stride_vh, stride_vn, stride_oh, stride_on,
    DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores of one block of queries against one block of vectors of one KV head."""
    head = tl.program_id(0)
    vector_block = tl.program_id(1)
    query_block = tl.program_id(2)
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    vectors = vector_block * BLOCK_V + tl.arange(0, BLOCK_V)
    dims = tl.arange(0, DIM)
    q_ok = queries < n_queries
    v_ok = vectors < n_vectors
    q_off = head.to(tl.int64) * stride_qh + queries[:, None].to(tl.int64) * stride_qn + dims[None, :]
    v_off = head.to(tl.int64) * stride_vh + vectors[:, None].to(tl.int64) * stride_vn + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=q_ok[:, None], other=0.0)
    v = tl.load(v_ptr + v_off, mask=v_ok[:, None], other=0.0)
    if UPCAST:
        q, v = q.to(tl.float32), v.to(tl.float32)
    scores = tl.dot(q, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_Q, BLOCK_V) float32
    o_off = head.to(tl.int64) * stride_oh + queries[:, None].to(tl.int64) * stride_on + vectors[None, :]
    tl.store(out_ptr + o_off, scores, mask=q_ok[:, None] & v_ok[None, :])


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_scores_kernel, do_not_specialize=["n_queries", "n_vectors"])  # as in span_scores


def check_inputs(queries: torch.Tensor, vectors: torch.Tensor) -> None:
    if queries.dim() != 3 or vectors.dim() != 3 or queries.shape[0] != vectors.shape[0]:
        raise ValueError(
            f"vector_scores wants queries (nheads_kv, n_queries, dim) and vectors (nheads_kv, n_vectors, dim), "
            f"got {tuple(queries.shape)} and {tuple(vectors.shape)}."
        )
    if queries.shape[2] != vectors.shape[2]:
        raise ValueError(f"queries and vectors must have the same dim, got {queries.shape[2]} and {vectors.shape[2]}.")
    if queries.device != vectors.device:
        raise ValueError(f"queries and vectors must be on one device, got {queries.device} and {vectors.device}.")


def check_kernel_vectors(vectors: torch.Tensor, kernel: str) -> None:
    """What a scores kernel needs of the vectors: a power-of-2 dim 16..256, a float dtype, dims contiguous."""
    dim = vectors.shape[2]
    if dim < 16 or dim > 256 or dim & (dim - 1):
        raise ValueError(f"The {kernel} kernel supports power-of-2 dims 16..256, got {dim}.")
    if vectors.dtype not in _DTYPES:
        raise ValueError(f"The {kernel} kernel takes float16, bfloat16 or float32 vectors, got {vectors.dtype}.")
    if vectors.stride(2) != 1:
        raise ValueError(f"vectors must be contiguous in dim (stride 1), got strides {vectors.stride()}.")


def vector_scores_triton(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The kernel's launch; same contract as vector_scores."""
    check_inputs(queries, vectors)
    check_kernel_vectors(vectors, "vector scores")
    dim = vectors.shape[2]
    queries = queries.to(vectors.dtype).contiguous()
    nheads_kv, n_queries, _ = queries.shape
    n_vectors = vectors.shape[1]
    out = torch.empty(nheads_kv, n_queries, n_vectors, dtype=torch.float32, device=vectors.device)
    if n_queries == 0 or n_vectors == 0:
        return out
    interpret = interpreting()
    exact = interpret or vectors.dtype == torch.float32
    block_v, warps = (_BLOCK_V_FLOAT32, _WARPS_FLOAT32) if vectors.dtype == torch.float32 else (_BLOCK_V, 4)
    grid = (nheads_kv, -(-n_vectors // block_v), -(-n_queries // _BLOCK_Q))
    _triton_kernels(interpret)[grid](
        queries, vectors, out, n_queries, n_vectors,
        queries.stride(0), queries.stride(1), vectors.stride(0), vectors.stride(1), out.stride(0), out.stride(1),
        DIM=dim, BLOCK_Q=_BLOCK_Q, BLOCK_V=block_v, UPCAST=exact, DOT_PRECISION="ieee" if exact else "tf32",
        num_warps=warps,
    )  # fmt: skip
    return out


def vector_scores_reference(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Plain torch: the queries rounded to the vectors' dtype, the product in float32 (float64 for float64)."""
    check_inputs(queries, vectors)
    compute = torch.promote_types(vectors.dtype, torch.float32)
    return torch.matmul(queries.to(vectors.dtype).to(compute), vectors.to(compute).transpose(1, 2))


def vector_scores(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """queries (nheads_kv, n_queries, dim) . vectors (nheads_kv, n_vectors, dim) -> (nheads_kv, n_queries,
    n_vectors) float32: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(queries, vectors):
        return vector_scores_triton(queries, vectors)
    return vector_scores_reference(queries, vectors)
