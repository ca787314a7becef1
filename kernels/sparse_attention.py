"""Attention of a few queries over a gathered key set (sinks + selected tokens + window), split over the keys.

Batch size is 1, so tensors drop the batch dim:

    q       (nheads, q_len, headdim)         queries, already rotated
    k, v    (nheads_kv, n_keys, headdim)     gathered keys/values per KV head, already rotated
    n_valid (nheads_kv,) int                 keys [0, n_valid[h]) of KV head h are real, the rest padding
    out     (nheads, q_len, headdim)         in q's dtype
    lse     (nheads, q_len) float32          natural-log log-sum-exp of the scaled scores (-inf: no key seen)

GQA: query head h reads KV head h // (nheads // nheads_kv). With ``causal`` the q_len queries are the last
q_len positions of the valid keys: query i sees keys j <= n_valid - q_len + i.

The Triton path (flash-decoding): one program per (KV head, block of packed query rows, block of keys). The
rows of a program are every (query head of the GQA group, query position) pair, so each K/V tile is read
once for the whole group. Each program writes a partial output and its lse; a second kernel merges the
splits with a log-sum-exp reduction, or (``fused_merge``) the last program of each row block to finish does, counted
by an atomic ticket: one launch instead of two. fp16/bf16/fp32 inputs, fp32 accumulation. Triton is imported only when
a kernel is launched: CUDA tensors run the kernel, CPU tensors the torch reference, unless TRITON_INTERPRET=1
(then the kernel runs in Triton's interpreter, which is how the tests check it on a CPU).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------- kernels


def _split_kernel(
    q_ptr, k_ptr, v_ptr, n_valid_ptr, o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, tickets_ptr,
    stride_qh, stride_ql, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_ol,
    q_len, n_keys, n_splits, split_n, qk_scale,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_N_VALID: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """Partial attention of one row block of a GQA group over keys [split * split_n, (split + 1) * split_n); with
    FUSED_MERGE the last program of a row block to finish also merges it (``_finish_split``): one launch, not two."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)

    # packed rows: row = g * q_len + i, query head kv_head * GROUP + g at position i
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * q_len
    head = kv_head * GROUP + rows // q_len
    pos = rows % q_len
    dims = tl.arange(0, HEADDIM)

    n_kv = n_keys
    if HAS_N_VALID:
        n_kv = tl.minimum(tl.maximum(tl.load(n_valid_ptr + kv_head).to(tl.int32), 0), n_keys)
    if CAUSAL:
        limit = n_kv - q_len + pos + 1  # (BLOCK_M,) keys j < limit are seen
    else:
        limit = tl.zeros([BLOCK_M], dtype=tl.int32) + n_kv

    q_off = head.to(tl.int64)[:, None] * stride_qh + pos[:, None] * stride_ql + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HEADDIM)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEADDIM], dtype=tl.float32)
    start = split * split_n
    m_i, l_i, acc = _attend_keys(q, k_ptr + kv_head.to(tl.int64) * stride_kh, v_ptr + kv_head.to(tl.int64) * stride_vh,
                                 stride_kn, stride_vn, start, tl.minimum(start + split_n, n_kv), limit, m_i, l_i, acc,
                                 qk_scale, HEADDIM, BLOCK_N, UPCAST, DOT_PRECISION)  # fmt: skip

    _finish_split(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, tickets_ptr, stride_oh, stride_ol, acc, m_i, l_i,
                  head * q_len + pos, row_ok, kv_head, row_block, q_len, n_splits, split,
                  GROUP, HEADDIM, BLOCK_M, FUSED_MERGE, MERGE_M, MERGE_S)  # fmt: skip


def _attend_keys(
    q, k_base, v_base, stride_kn, stride_vn, start, stop, limit, m_i, l_i, acc, qk_scale,
    HEADDIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The online softmax over keys [start, stop) of one KV head's contiguous rows (k_base, v_base: its first), each
    row r of q seeing keys j < limit[r] -> m_i, l_i, acc (``_attend_block``'s)."""
    dims = tl.arange(0, HEADDIM)
    for block_start in range(start, stop, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        key_ok = keys < stop
        at = keys.to(tl.int64)[:, None]
        k = tl.load(k_base + at * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)  # (BLOCK_N, HEADDIM)
        v = tl.load(v_base + at * stride_vn + dims[None, :], mask=key_ok[:, None], other=0.0)
        seen = keys[None, :] < limit[:, None]
        m_i, l_i, acc = _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)
    return m_i, l_i, acc


def _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: q (BLOCK_M, HEADDIM) over a tile k, v (BLOCK_N, HEADDIM) where seen (BLOCK_M,
    BLOCK_N) is true; m_i, l_i (BLOCK_M,) running max and sum (log2 units), acc (BLOCK_M, HEADDIM) -> the three."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _finish_split(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, tickets_ptr, stride_oh, stride_ol, acc, m_i, l_i, out_rows, row_ok,
    kv_head, row_block, q_len, n_splits, split,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """Write a split's partial output and lse for its rows (out_rows = head * q_len + pos, (BLOCK_M,)); with
    FUSED_MERGE the last program of the row block to finish (counted in tickets_ptr, one int32 per row block, zero
    between launches) merges the block's partial results into out and lse, then sets its ticket back to 0."""
    dims = tl.arange(0, HEADDIM)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    part_row = out_rows.to(tl.int64) * n_splits + split  # o_part (nheads * q_len, n_splits, HEADDIM)
    tl.store(o_part_ptr + part_row[:, None] * HEADDIM + dims[None, :], out, mask=row_ok[:, None])
    tl.store(lse_part_ptr + part_row, lse, mask=row_ok)

    if FUSED_MERGE:
        tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
        ticket = tickets_ptr + kv_head * tl.num_programs(2) + row_block
        if tl.atomic_add(ticket, 1, sem="acq_rel") == n_splits - 1:
            first_row = row_block * BLOCK_M
            block_rows = tl.minimum(BLOCK_M, GROUP * q_len - first_row)
            for r0 in range(0, block_rows, MERGE_M):
                merge_rows = first_row + r0 + tl.arange(0, MERGE_M)
                _merge_rows(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, stride_oh, stride_ol, q_len, n_splits,
                            kv_head * GROUP + merge_rows // q_len, merge_rows % q_len,
                            r0 + tl.arange(0, MERGE_M) < block_rows, HEADDIM, MERGE_M, MERGE_S)  # fmt: skip
            tl.atomic_xchg(ticket, 0)  # ready for the next launch


def _merge_rows(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, stride_oh, stride_ol, q_len, n_splits, head, pos, row_ok,
    HEADDIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of the n_splits partial results of ROWS rows (head, pos), each (ROWS,); row_ok masks.

    Reads partials that other programs wrote through L2 (.cg), ROWS x BLOCK_S x HEADDIM at a time.
    """
    dims = tl.arange(0, HEADDIM)
    part_base = (head * q_len + pos).to(tl.int64) * n_splits  # (ROWS,) first partial row of each row
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (splits < n_splits)[None, :]
        lse_parts = tl.load(lse_part_ptr + part_base[:, None] + splits[None, :], mask=ok, other=float("-inf"),
                            cache_modifier=".cg")  # fmt: skip
        m = tl.maximum(m, tl.max(lse_parts, 1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    total = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEADDIM], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (splits < n_splits)[None, :]
        part_rows = part_base[:, None] + splits[None, :]  # (ROWS, BLOCK_S)
        w = tl.exp(tl.load(lse_part_ptr + part_rows, mask=ok, other=float("-inf"), cache_modifier=".cg")
                   - m_safe[:, None])  # fmt: skip
        o = tl.load(o_part_ptr + part_rows[:, :, None] * HEADDIM + dims[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")  # (ROWS, BLOCK_S, HEADDIM)  # fmt: skip
        total += tl.sum(w, 1)
        acc += tl.sum(w[:, :, None] * o, 1)
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    out_off = head.to(tl.int64)[:, None] * stride_oh + pos[:, None] * stride_ol + dims[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + head * q_len + pos, tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf")),
             mask=row_ok)  # fmt: skip


# the plain functions; _triton_kernels binds the helpers' names to their JIT wrappers (kernels/selected_attention.py
# calls them too)
_MERGE_ROWS, _ATTEND_KEYS, _ATTEND_BLOCK, _FINISH_SPLIT = _merge_rows, _attend_keys, _attend_block, _finish_split


def _merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, stride_oh, stride_ol, n_rows, q_len, n_splits,
    HEADDIM: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """The second launch when the merge is not fused: MERGE_M (query head, position) rows per program."""
    rows = tl.program_id(0) * MERGE_M + tl.arange(0, MERGE_M)  # row = head * q_len + pos
    _merge_rows(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, stride_oh, stride_ol, q_len, n_splits,
                rows // q_len, rows % q_len, rows < n_rows, HEADDIM, MERGE_M, MERGE_S)  # fmt: skip


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrappers of the kernels above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _merge_rows, _attend_keys, _attend_block, _finish_split
    import triton
    import triton.language

    tl = triton.language
    _merge_rows = triton.jit(_MERGE_ROWS)  # the kernels call the helpers by these global names
    _attend_keys, _attend_block = triton.jit(_ATTEND_KEYS), triton.jit(_ATTEND_BLOCK)
    _finish_split = triton.jit(_FINISH_SPLIT)
    return triton.jit(_split_kernel), triton.jit(_merge_kernel)


# --------------------------------------------------------------------------------------------- launcher


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor | None) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference paths."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"sparse_attention wants q (nheads, q_len, headdim) and k, v (nheads_kv, n_keys, headdim), "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}."
        )
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same headdim, got {q.shape[2]} and {k.shape[2]}.")
    if k.shape[0] == 0 or q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"nheads ({q.shape[0]}) must be a multiple of nheads_kv ({k.shape[0]}).")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if n_valid is not None:
        if n_valid.shape != (k.shape[0],) or n_valid.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"n_valid must be an int32/int64 tensor of shape (nheads_kv,) = ({k.shape[0]},), "
                f"got {n_valid.dtype} {tuple(n_valid.shape)}."
            )
        if n_valid.device != k.device:
            raise ValueError(f"n_valid must be on {k.device}, got {n_valid.device}.")


def _check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What the Triton kernel needs beyond _check_inputs."""
    headdim = q.shape[2]
    if headdim < 16 or headdim > 256 or headdim & (headdim - 1):
        raise ValueError(f"The sparse attention kernel supports power-of-2 headdims 16..256, got {headdim}.")
    if q.dtype not in _DTYPES:
        raise ValueError(f"The sparse attention kernel takes float16, bfloat16 or float32, got {q.dtype}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in headdim (stride 1), got strides {t.stride()}: "
                             f"call .contiguous() first.")  # fmt: skip


class Tiles(NamedTuple):
    """Launch shape of the split kernel (benchmarks/speed/attention.py sweeps it)."""

    block_m: int  # packed query rows per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int = 2


def default_tiles(rows: int, dtype: torch.dtype) -> Tiles:
    """Tile sizes: a small GQA group's rows in one program (tl.dot needs at least 16 rows).

    float32 uses 16 x 32 tiles on 8 warps: its exact (non-tensor-core) dot spills registers on sm_90 with larger
    ones (ptxas, Triton 3.6 and 3.9); fp16/bf16 use up to 64 x 64 on 4 warps (no spills) and 3 pipeline stages: on
    the H100 a bf16 decode step over 3136 keys took 0.0162 ms with 3 stages, 0.0172 ms with 2 (graph replays,
    ``benchmarks/speed/results/attention_h100_7e52b02.json``, its sweep).
    """
    if dtype == torch.float32:
        return Tiles(16, 32, 8)
    return Tiles(16 if rows <= 16 else 32 if rows <= 32 else 64, 64, 4, 3)


_MERGE_ELEMENTS = 8192  # a merge step's ROWS x BLOCK_S x HEADDIM tile: 64 fp32 registers a thread on 4 warps


def _merge_shape(rows: int, block_m: int, n_splits: int, headdim: int) -> tuple[int, int]:
    """(MERGE_M, MERGE_S): rows and splits merged per step, powers of 2 (at least 2 rows)."""
    merge_m = max(2, min(block_m, _next_pow2(rows)))
    merge_s = max(1, min(_next_pow2(n_splits), _MERGE_ELEMENTS // (merge_m * headdim)))
    return merge_m, merge_s


# On since it ran on the H100 (9cb8722/7e52b02): tests/test_kernel_sparse_attention.py passed there (the tickets'
# ordering, replays of a captured launch), and the attention benchmark's sweep over 3136 keys had one launch at or
# below two in three of its four launch shapes (graph replays 0.0144 against 0.0150 ms at the default one now; the
# fourth, the old default, 0.0172 against 0.0169), and well below without graphs (0.0133 against 0.0156 ms).
FUSED_MERGE_DEFAULT = True

_TICKETS: dict[torch.device, torch.Tensor] = {}
_TICKET_COUNT = 65536  # row blocks a fused launch may have (a 2048-token chunk of 8 KV heads has 8 x 128)


def _tickets(device: torch.device, n: int) -> torch.Tensor | None:
    """The fused merge's zeroed int32 counters, one per row block: one buffer per device, made once and never freed
    (a captured CUDA graph keeps its address), each launch leaving its counters at 0.

    None (the caller merges in a second launch) for more than _TICKET_COUNT row blocks, or when the buffer would be
    made during CUDA graph capture (it would be zeroed only at replay). Launches on one device must not run at the
    same time (one stream).
    """
    if n > _TICKET_COUNT:
        return None
    tickets = _TICKETS.get(device)
    if tickets is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        tickets = _TICKETS[device] = torch.zeros(_TICKET_COUNT, dtype=torch.int32, device=device)
    return tickets


# Programs per SM a split aims for. Over 16K keys (8 KV heads, bf16, per layer in a graph of 8) the H100 took
# 0.0347 ms in the 256-key splits that 4 per SM gave, 0.0303 in 512-key splits (about 2 per SM); over 64K and 256K
# keys the longest splits tried were the fastest (``kernel_sweep`` in
# benchmarks/speed/results/bandwidth_h100_c796a0e.json). As the default (bandwidth_h100_08729da.json, another run):
# 16K keys 0.0300 ms, 64K 0.0938, 256K 0.3466, where c796a0e's run with 4 per SM took 0.0347, 0.1050 and 0.3974;
# 3,136 keys unchanged (0.0115).
_PROGRAMS_PER_SM = 2


@functools.cache
def _program_target(device_index: int | None) -> int:
    """Programs that keep the device busy: _PROGRAMS_PER_SM per SM on a GPU; 16 in the interpreter (so tests see
    several splits)."""
    if device_index is None:
        return 16
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count


# On the H100 a bf16 decode step over 3136 keys (8 KV heads, 4 query heads each) took 0.0144 ms in 256-key splits
# (4 blocks) against 0.0162 in the 128-key splits that 2 blocks gave (graph replays, sweep at 7e52b02).
_MIN_SPLIT_BLOCKS = 4


def _split_size(n_keys: int, other_programs: int, block_n: int, device: torch.device, split_size: int | None) -> int:
    """Keys per split, a multiple of the key block.

    By default: enough splits for about _PROGRAMS_PER_SM programs per SM, but at least _MIN_SPLIT_BLOCKS key blocks
    per split (so that loads overlap math, and the partial results stay small next to the keys read).
    benchmarks/speed/attention.py sweeps split sizes on the GPU.
    """
    if split_size is None:
        target = _program_target(device.index if device.type == "cuda" and not interpreting() else None)
        n_splits = max(1, min(_cdiv(n_keys, _MIN_SPLIT_BLOCKS * block_n), _cdiv(target, other_programs)))
        split_size = _cdiv(n_keys, n_splits)
    return max(block_n, _cdiv(split_size, block_n) * block_n)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    split_size: int | None = None,
    tiles: Tiles | None = None,
    fused_merge: bool = FUSED_MERGE_DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel(s); same contract as sparse_attention.

    split_size: keys per split (default: _split_size's choice); tiles: default_tiles' unless given; fused_merge:
    the split kernel's last program of each row block merges (one launch), else a second kernel does.
    """
    _check_inputs(q, k, v, n_valid)
    _check_kernel_inputs(q, k, v)
    nheads, q_len, headdim = q.shape
    nheads_kv, n_keys, _ = k.shape
    group = nheads // nheads_kv
    scale = 1.0 / math.sqrt(headdim) if scale is None else float(scale)
    out = torch.empty_like(q)
    lse = torch.empty(nheads, q_len, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out, lse
    if n_keys == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    tiles = tiles or default_tiles(group * q_len, q.dtype)
    row_blocks = _cdiv(group * q_len, tiles.block_m)
    split_n = _split_size(n_keys, nheads_kv * row_blocks, tiles.block_n, q.device, split_size)
    n_splits = _cdiv(n_keys, split_n)
    o_part = torch.empty(nheads * q_len, n_splits, headdim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(nheads * q_len, n_splits, dtype=torch.float32, device=q.device)
    tickets = _tickets(q.device, nheads_kv * row_blocks) if fused_merge else None
    merge_m, merge_s = _merge_shape(group * q_len, tiles.block_m, n_splits, headdim)

    interpret = interpreting()
    split_kernel, merge_kernel = _triton_kernels(interpret)
    split_kernel[(nheads_kv, n_splits, row_blocks)](
        q, k, v, n_valid if n_valid is not None else q, o_part, lse_part, out, lse,
        tickets if tickets is not None else lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        q_len, n_keys, n_splits, split_n, scale * _LOG2E,
        GROUP=group, HEADDIM=headdim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        CAUSAL=bool(causal), HAS_N_VALID=n_valid is not None,
        UPCAST=interpret or q.dtype == torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32",
        FUSED_MERGE=tickets is not None, MERGE_M=merge_m, MERGE_S=merge_s,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if tickets is None:
        merge_kernel[(_cdiv(nheads * q_len, merge_m),)](
            o_part, lse_part, out, lse, out.stride(0), out.stride(1), nheads * q_len, q_len, n_splits,
            HEADDIM=headdim, MERGE_M=merge_m, MERGE_S=merge_s, num_warps=4,
        )  # fmt: skip
    return out, lse


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# --------------------------------------------------------------------------------------------- reference


def _key_mask(q_len: int, n_keys: int, nheads_kv: int, n_valid, causal: bool, device) -> torch.Tensor:
    """(nheads_kv, q_len, n_keys) bool: which keys each query position sees."""
    if n_valid is None:
        n_kv = torch.full((nheads_kv,), n_keys, device=device)
    else:
        n_kv = n_valid.to(device=device, dtype=torch.int64).clamp(0, n_keys)
    keys = torch.arange(n_keys, device=device)
    limit = n_kv[:, None].expand(nheads_kv, q_len)  # (nheads_kv, q_len)
    if causal:
        limit = limit - q_len + 1 + torch.arange(q_len, device=device)
    return keys[None, None, :] < limit[:, :, None]


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, float32 math (float64 for float64 inputs): the contract the kernel must meet.

    out in q's dtype; lse float32 (float64 for float64 inputs, so that tests hold a float64 reference).
    """
    _check_inputs(q, k, v, n_valid)
    nheads, q_len, headdim = q.shape
    nheads_kv, n_keys, _ = k.shape
    group = nheads // nheads_kv
    scale = 1.0 / math.sqrt(headdim) if scale is None else float(scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    k_heads = k.to(compute).repeat_interleave(group, dim=0)  # (nheads, n_keys, headdim)
    v_heads = v.to(compute).repeat_interleave(group, dim=0)
    scores = torch.matmul(q.to(compute), k_heads.transpose(1, 2)) * scale  # (nheads, q_len, n_keys)
    mask = _key_mask(q_len, n_keys, nheads_kv, n_valid, causal, q.device).repeat_interleave(group, dim=0)
    scores = scores.masked_fill(~mask, float("-inf"))
    # Padding may hold anything (NaN too): a key no query sees must add 0, not 0 * its value.
    v_heads = v_heads.masked_fill(~mask.any(dim=1)[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)  # (nheads, q_len), -inf where no key is seen
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.matmul(probs, v_heads)
    return out.to(q.dtype), lse


def merge_partial(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of disjoint key sets from the parts' (out, lse).

    outs: each (nheads, q_len, headdim); lses: each (nheads, q_len) natural-log. Returns (out in outs[0]'s
    dtype, lse float32); a row no part saw stays out 0, lse -inf.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_partial needs one lse per out and at least one part, got {len(outs)} and {len(lses)}.")
    lse_all = torch.stack([lse.float() for lse in lses])  # (parts, nheads, q_len)
    lse_max = lse_all.amax(dim=0)
    lse_max = lse_max.masked_fill(lse_max == float("-inf"), 0.0)
    weights = torch.exp(lse_all - lse_max)  # (parts, nheads, q_len)
    total = weights.sum(dim=0)
    out = sum(w[..., None] * o.float() for w, o in zip(weights, outs, strict=True))
    seen = total > 0
    out = out / torch.where(seen, total, 1.0)[..., None]
    lse = torch.where(seen, lse_max + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    return out.to(outs[0].dtype), lse


# --------------------------------------------------------------------------------------------- public


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (nheads, q_len, headdim) over k, v (nheads_kv, n_keys, headdim) -> (out, lse).

    n_valid (nheads_kv,): valid keys per KV head, the rest is padding; causal: the queries are the last
    q_len positions of the valid keys; scale defaults to 1/sqrt(headdim). out (nheads, q_len, headdim) in
    q's dtype, lse (nheads, q_len) float32. The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the
    torch reference otherwise.
    """
    if use_triton(q, k, v):
        return sparse_attention_triton(q, k, v, n_valid, causal, scale)
    return sparse_attention_reference(q, k, v, n_valid, causal, scale)
