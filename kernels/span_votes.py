"""Span votes: the query heads' summed softmax over the spans' Quest upper bounds, in two launches.

    q       (nheads, headdim)                   a decode step's queries (one position), nheads = nheads_kv * group
    bounds  (nheads_kv, 2 * headdim, n_spans)   [kmax; kmin] per span: each span's keys' componentwise max, then
                                                their min, laid out for the matmul (contiguous in the span axis)
    votes   (n_spans,) float32                  sums to nheads (each head's softmax sums to 1)

What is computed (benchmarks/speed/attention.py's span_votes): for query head h of KV head g,

    upper_h[s] = sum_i max(q_h,i, 0) kmax_g,i[s] + min(q_h,i, 0) kmin_g,i[s]     (Quest's upper bound on q_h . k
                                                                                 over the keys k of span s)
    votes[s]   = sum_h softmax_s(upper_h / sqrt(headdim))[s]

Torch ran it as five launches (the two clamps, the concatenation, the batched matmul, the softmax and the sum).
Triton, two launches: kernel 1, grid (nheads_kv, n_blocks), builds [relu(q); min(q, 0)] of the group's heads in
registers (padded to 16 rows for tl.dot), scores a (2 * headdim, BLOCK_S) tile of bounds with tensor-core dots, 64 bound
rows a step, and writes the scaled logits (nheads, n_spans) float32 and each head's log-sum-exp of the block (nheads,
n_blocks); kernel 2 is SparQ's probabilities kernel (sparq_scores._group_probs_kernel) launched with one group of all
nheads heads: it reduces each head's block log-sum-exps and sums exp(logit - lse) over the heads. (Its grid's key blocks
and the block log-sum-exps it reduces need not match, n_blocks is an argument; both use sparq's block size here.)

The dot is float32's exact one for float32 inputs, the tensor cores' (float32 sums) for half precision; headdim a
power of 2 up to 128 (256 spills registers). exp(logit - lse) puts a few float32 ulps of the largest logit on each
vote, relative (torch's softmax subtracts its maximum exactly): 2e-6 at logits near 15. A span whose bound is -inf
for every head (infinite bounds only) gets -inf, where the reference gives 0.
CUDA tensors run the kernels, CPU tensors the torch reference, unless TRITON_INTERPRET=1 (then the interpreter
runs the kernels, in float32 for half-precision inputs, whose tl.dot it lacks).
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton
from .sparq_scores import _BLOCK_B, _BLOCK_N
from .sparq_scores import _triton_kernels as _sparq_kernels

__all__ = ["span_votes", "span_votes_reference", "span_votes_triton"]

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_S = _BLOCK_N  # spans a logits program scores; sparq's probabilities kernel normalises _BLOCK_N at a time
_BLOCK_Q = 16  # tl.dot needs at least 16 rows
# Bound rows a logits program reads per step. With the whole (2 * headdim, 64) tile at once, the votes (both launches)
# read the 67 MB of bounds at 512K tokens in 0.059 ms on the H100 (1.13 TB/s; ``stages_ms`` in
# benchmarks/speed/results/attention_h100_36a1228.json). With 64 rows a step (8a45294) they took 0.040 ms on an H200
# (1.65 TB/s; ``attention_h200_9bb52c4.json``): another card, so the two runs do not compare.
_BLOCK_D = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _votes_logits_kernel(
    q_ptr, bounds_ptr, logits_ptr, block_lse_ptr,
    stride_qh, stride_bh, stride_bd, n_spans, n_blocks, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """logits[h, spans] = [relu(q_h); min(q_h, 0)] . bounds[kv_head, :, spans] * scale for the group's heads h;
    each head's log-sum-exp over the block's spans. The 2 * HEADDIM bound rows are read BLOCK_D at a time (each step
    within the kmax half or the kmin half), so that the loads pipeline and few registers hold them."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    spans = block * BLOCK_S + tl.arange(0, BLOCK_S)
    span_in = spans < n_spans
    q_rows = q_ptr + heads[:, None].to(tl.int64) * stride_qh
    b_base = bounds_ptr + kv_head.to(tl.int64) * stride_bh + spans[None, :]
    logits = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    for d0 in range(0, 2 * HEADDIM, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)  # bound row d: kmax component d below HEADDIM, kmin component d - HEADDIM
        q = tl.load(q_rows + (dims % HEADDIM)[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
        q_bound = tl.where(d0 < HEADDIM, tl.maximum(q, 0.0), tl.minimum(q, 0.0))  # (BLOCK_G, BLOCK_D)
        b = tl.load(b_base + dims[:, None].to(tl.int64) * stride_bd, mask=span_in[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        else:
            q_bound = q_bound.to(b.dtype)  # a half-precision tensor-core dot, float32 sums
        logits += tl.dot(q_bound, b, input_precision=DOT_PRECISION)  # (BLOCK_G, BLOCK_S)
    logits = logits * scale
    out_off = heads[:, None].to(tl.int64) * n_spans + spans[None, :]
    tl.store(logits_ptr + out_off, logits, mask=head_ok[:, None] & span_in[None, :])

    logits = tl.where(span_in[None, :], logits, float("-inf"))
    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(logits - m_safe[:, None]), 1)
    lse = tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(block_lse_ptr + heads * n_blocks + block, lse, mask=head_ok)


@functools.cache
def _triton_kernels(interpret: bool):
    """The logits kernel's JIT wrapper and sparq's probabilities kernel; the only place triton is imported here."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    (probs,) = (kernel for kernel in _sparq_kernels(interpret) if kernel.__name__ == "_group_probs_kernel")
    return triton.jit(_votes_logits_kernel), probs


def _check_inputs(q: torch.Tensor, bounds: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference paths."""
    if q.dim() != 2 or bounds.dim() != 3:
        raise ValueError(f"span_votes wants q (nheads, headdim) and bounds (nheads_kv, 2 * headdim, n_spans), "
                         f"got {tuple(q.shape)} and {tuple(bounds.shape)}.")  # fmt: skip
    if bounds.shape[1] != 2 * q.shape[1]:
        raise ValueError(f"bounds must have 2 * headdim ({2 * q.shape[1]}) rows [kmax; kmin], got {bounds.shape[1]}.")
    if bounds.shape[0] == 0 or q.shape[0] == 0 or q.shape[0] % bounds.shape[0]:
        raise ValueError(f"nheads ({q.shape[0]}) must be a positive multiple of nheads_kv ({bounds.shape[0]}).")
    if q.dtype != bounds.dtype:
        raise ValueError(f"q and bounds must have one dtype, got {q.dtype} and {bounds.dtype}.")
    if q.device != bounds.device:
        raise ValueError(f"q and bounds must be on one device, got {q.device} and {bounds.device}.")


def span_votes_triton(q: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Launch the logits kernel and sparq's probabilities kernel; same contract as span_votes."""
    _check_inputs(q, bounds)
    headdim = q.shape[1]
    if headdim < 16 or headdim > 128 or headdim & (headdim - 1):
        raise ValueError(f"The span votes kernel supports power-of-2 headdims 16..128, got {headdim}.")
    if q.dtype not in _DTYPES:
        raise ValueError(f"The span votes kernel takes float16, bfloat16 or float32 inputs, got {q.dtype}.")
    if bounds.stride(2) != 1:
        raise ValueError(f"bounds must be contiguous in the span axis (stride 1), got strides {bounds.stride()}.")
    q = q.contiguous()
    nheads = q.shape[0]
    nheads_kv, _, n_spans = bounds.shape
    group = nheads // nheads_kv
    votes = torch.empty(n_spans, dtype=torch.float32, device=q.device)
    if n_spans == 0:
        return votes
    n_blocks = -(-n_spans // _BLOCK_S)
    logits = torch.empty(nheads, n_spans, dtype=torch.float32, device=q.device)
    block_lse = torch.empty(nheads, n_blocks, dtype=torch.float32, device=q.device)
    exact = interpreting() or q.dtype == torch.float32

    logits_kernel, probs_kernel = _triton_kernels(interpreting())
    logits_kernel[(nheads_kv, n_blocks)](
        q, bounds, logits, block_lse, q.stride(0), bounds.stride(0), bounds.stride(1), n_spans, n_blocks,
        headdim**-0.5, GROUP=group, BLOCK_G=max(_BLOCK_Q, 1 << (group - 1).bit_length()), HEADDIM=headdim,
        BLOCK_S=_BLOCK_S, BLOCK_D=min(_BLOCK_D, headdim), UPCAST=exact, DOT_PRECISION="ieee" if exact else "tf32",
        num_warps=8 if q.dtype == torch.float32 else 4, num_stages=3,
    )  # fmt: skip
    probs_kernel[(1, n_blocks)](
        logits, block_lse, votes, n_spans, n_blocks, GROUP=nheads, BLOCK_G=1 << (nheads - 1).bit_length(),
        BLOCK_N=_BLOCK_N, BLOCK_B=_BLOCK_B, num_warps=4,
    )  # fmt: skip
    return votes


def span_votes_reference(q: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Plain torch (the benchmark's five launches): float32 math and result (float64 for float64 inputs)."""
    _check_inputs(q, bounds)
    nheads_kv, two_headdim, _ = bounds.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    q = q.to(compute)
    q_bound = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1).reshape(nheads_kv, -1, two_headdim)
    upper = torch.bmm(q_bound, bounds.to(compute))  # (nheads_kv, group, n_spans): Quest's upper bound
    return torch.softmax(upper * (2.0 / two_headdim) ** 0.5, dim=-1).sum(dim=(0, 1))


def span_votes(q: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The heads' vote for each span (n_spans,) float32: the summed softmax of their Quest upper bounds.

    q (nheads, headdim), bounds (nheads_kv, 2 * headdim, n_spans) [kmax; kmin] (see the module docstring). The
    Triton kernels on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    """
    if use_triton(q, bounds):
        return span_votes_triton(q, bounds)
    return span_votes_reference(q, bounds)
