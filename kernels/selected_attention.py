"""A decode step's attention over resident keys and selected tokens read where they are stored, in one launch.

Batch size is 1 and the step has one query position:

    q             (nheads, headdim)              the step's query, pre-RoPE
    q_cos, q_sin  (headdim,)                     RoPE of the query's place
    k_res, v_res  (nheads_kv, n_res, headdim)    keys already rotated (the sinks and the window) and their values
    k_src, v_src  (nheads_kv, n_src, headdim)    pre-RoPE keys and values the selected tokens are read from
    rows          (nheads_kv, n_sel) int         each KV head's selected rows of k_src / v_src, or, with candidates,
                                                 positions in candidates
    candidates    (n_cand,) int, optional        the rows of k_src / v_src that rows index (a top-k's input rows)
    cos, sin      (n_sel, headdim)               RoPE of the selected tokens' places (slot j: row j)
  returns
    out           (nheads, 1, headdim)           in q's dtype
    lse           (nheads, 1) float32            natural-log log-sum-exp of the scaled scores

The step attends over the n_res resident keys and the n_sel selected tokens, the query rotated by (q_cos, q_sin)
and selected token j of KV head h rotated by (cos[j], sin[j]) at its compact place. GQA: query head h reads KV head
h // (nheads // nheads_kv).

What it replaces: gathering the selected tokens' keys and values, rotating the keys, writing them between the sinks
and the window of a resident buffer, rotating the query, then the sparse attention kernel over that buffer (on the
H100 at 512K tokens of context, the attention benchmark's ``gather``, ``place`` and ``rotate_query`` stages took
0.090 ms a layer against the attention's 0.014: ``stages_ms`` in
``benchmarks/speed/results/attention_h100_83c3791.json``). Here the split programs of the resident keys read them as
``sparse_attention``'s do, and the selected tokens' programs read each token's key (and its rotate-half partner,
from L1), its value and its RoPE row through ``rows``, rotate the key in registers as ``pack_rotate`` does (each
product rounded to the dtype, as the eager step's torch ops round them) and attend; the last program of a KV head
merges the splits (``sparse_attention``'s fused merge, its tickets and its helpers). When the tickets cannot be used
(inside a capture before any launch made them) a second launch merges.
On the H100 (36a1228, ``results/attention_h100_36a1228.json``) this kernel took 0.023 ms a layer at 128K and 512K,
where the four stages it replaces (gather, place, query rotation, attention) took 0.105 ms at both.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math

import torch

from . import check_rows, interpreting, use_triton
from . import sparse_attention as attention
from .pack_rotate import _DROP_BITS, _rotate

tl = None  # triton.language, bound by _triton_kernels() on first launch

_LOG2E = 1.4426950408889634
# Key blocks of selected tokens per split: a selected block's loads wait on each other (its rows, the candidates'
# rows, then keys, partners, RoPE rows, values), so its blocks go to programs of their own, which wait in parallel.
# (NOTES.md step 26: at 4 blocks a split, 36a1228's default, the kernel took 0.030 ms on an H200 at 128K against
# 0.0133 for the sparse kernel over a buffer of as many keys, each alone in a graph. One block a split: predicted,
# not measured yet, NOTES.md step 27.)
SELECT_SPLIT_BLOCKS = 1


# --------------------------------------------------------------------------------------------- kernel


def _selected_attention_kernel(
    q_ptr, q_cos_ptr, q_sin_ptr, k_res_ptr, v_res_ptr, k_src_ptr, v_src_ptr, rows_ptr, candidates_ptr, cos_ptr, sin_ptr,
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, tickets_ptr,
    stride_qh, stride_krh, stride_krn, stride_vrh, stride_vrn, stride_ksh, stride_ksn, stride_vsh, stride_vsn,
    stride_rows_h, stride_table, stride_oh,
    n_res, n_sel, res_splits, n_splits, split_n, select_split_n, qk_scale,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, DROP_BITS: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
    FUSED_MERGE: tl.constexpr, MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
):  # fmt: skip
    """Partial attention of one KV head's query group over split `split`: resident keys [split * split_n, ...) for
    the first res_splits splits, selected tokens [(split - res_splits) * select_split_n, ...) for the others."""
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.arange(0, BLOCK_M)
    row_ok = group < GROUP
    head = kv_head * GROUP + group
    dims = tl.arange(0, HEADDIM)
    partner = (dims + HEADDIM // 2) % HEADDIM  # rotate_half's source column
    sign = tl.where(dims < HEADDIM // 2, -1.0, 1.0)

    q_at = q_ptr + head.to(tl.int64)[:, None] * stride_qh
    q = tl.load(q_at + dims[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_partner = tl.load(q_at + partner[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_cos = tl.load(q_cos_ptr + dims).to(tl.float32)
    q_sin = tl.load(q_sin_ptr + dims).to(tl.float32)
    q = _rope(q, q_partner, q_cos[None, :], (sign * q_sin)[None, :], DROP_BITS).to(q_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEADDIM], dtype=tl.float32)
    if split < res_splits:
        start = split * split_n
        stop = tl.minimum(start + split_n, n_res)
        m_i, l_i, acc = _attend_keys(q, k_res_ptr + kv_head.to(tl.int64) * stride_krh,
                                     v_res_ptr + kv_head.to(tl.int64) * stride_vrh, stride_krn, stride_vrn, start, stop,
                                     tl.zeros([BLOCK_M], dtype=tl.int32) + stop, m_i, l_i, acc, qk_scale, HEADDIM,
                                     BLOCK_N, UPCAST, DOT_PRECISION)  # fmt: skip
    else:
        k_base = k_src_ptr + kv_head.to(tl.int64) * stride_ksh
        v_base = v_src_ptr + kv_head.to(tl.int64) * stride_vsh
        start = (split - res_splits) * select_split_n
        stop = tl.minimum(start + select_split_n, n_sel)
        for block_start in range(start, stop, BLOCK_N):
            slots = block_start + tl.arange(0, BLOCK_N)
            slot_ok = slots < stop
            row = tl.load(rows_ptr + kv_head.to(tl.int64) * stride_rows_h + slots, mask=slot_ok, other=0)
            if HAS_CANDIDATES:
                row = tl.load(candidates_ptr + row, mask=slot_ok, other=0)
            at = row.to(tl.int64)[:, None]
            k = tl.load(k_base + at * stride_ksn + dims[None, :], mask=slot_ok[:, None], other=0.0)
            k_partner = tl.load(k_base + at * stride_ksn + partner[None, :], mask=slot_ok[:, None], other=0.0)
            table = slots.to(tl.int64)[:, None] * stride_table + dims[None, :]
            cos = tl.load(cos_ptr + table, mask=slot_ok[:, None], other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + table, mask=slot_ok[:, None], other=0.0).to(tl.float32)
            k = _rope(k.to(tl.float32), k_partner.to(tl.float32), cos, sign[None, :] * sin, DROP_BITS)
            k = k.to(k_src_ptr.dtype.element_ty)
            v = tl.load(v_base + at * stride_vsn + dims[None, :], mask=slot_ok[:, None], other=0.0)
            seen = row_ok[:, None] & slot_ok[None, :]
            m_i, l_i, acc = _attend_block(q, k, v, seen, m_i, l_i, acc, qk_scale, UPCAST, DOT_PRECISION)

    # one query position: each row's output is out[head] (the position stride is never used)
    _finish_split(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr, tickets_ptr, stride_oh, stride_oh, acc, m_i, l_i,
                  head, row_ok, kv_head, 0, 1, n_splits, split,
                  GROUP, HEADDIM, BLOCK_M, FUSED_MERGE, MERGE_M, MERGE_S)  # fmt: skip


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrapper of the kernel above, with sparse_attention's and pack_rotate's helpers bound to their JIT
    wrappers under the names the kernel calls; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _attend_keys, _attend_block, _finish_split, _rope
    import triton
    import triton.language

    from . import pack_rotate

    tl = triton.language
    attention._triton_kernels(interpret)
    pack_rotate._triton_kernels(interpret)
    _attend_keys, _attend_block = attention._attend_keys, attention._attend_block
    _finish_split, _rope = attention._finish_split, pack_rotate._rope
    return triton.jit(_selected_attention_kernel), attention._triton_kernels(interpret)[1]


# --------------------------------------------------------------------------------------------- launcher


def _check_inputs(q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates=None) -> None:
    """Shapes, dtypes and devices, shared by the kernel and the reference."""
    if q.dim() != 2 or k_res.dim() != 3 or k_src.dim() != 3:
        raise ValueError(f"selected_attention wants q (nheads, headdim), k_res and k_src (nheads_kv, n, headdim), got "
                         f"{tuple(q.shape)}, {tuple(k_res.shape)} and {tuple(k_src.shape)}.")  # fmt: skip
    nheads, headdim = q.shape
    nheads_kv = k_res.shape[0]
    if v_res.shape != k_res.shape or v_src.shape != k_src.shape:
        raise ValueError("selected_attention wants values shaped as their keys (v_res as k_res, v_src as k_src).")
    if k_src.shape[0] != nheads_kv or k_res.shape[2] != headdim or k_src.shape[2] != headdim:
        raise ValueError(f"k_res and k_src must be ({nheads_kv}, n, {headdim}), got {tuple(k_res.shape)} and "
                         f"{tuple(k_src.shape)}.")  # fmt: skip
    if nheads_kv == 0 or nheads % nheads_kv or headdim % 2:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv}), headdim ({headdim}) even.")
    if rows.dim() != 2 or rows.shape[0] != nheads_kv or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be an int32/int64 tensor (nheads_kv, n_sel) = ({nheads_kv}, n), got "
                         f"{rows.dtype} {tuple(rows.shape)}.")  # fmt: skip
    n_sel = rows.shape[1]
    tables = (tuple(cos.shape), tuple(sin.shape), tuple(q_cos.shape), tuple(q_sin.shape))
    if tables != ((n_sel, headdim),) * 2 + ((headdim,),) * 2:
        raise ValueError(f"cos and sin must be ({n_sel}, {headdim}) and q_cos, q_sin ({headdim},), got {tables}.")
    floats = (q, q_cos, q_sin, k_res, v_res, k_src, v_src, cos, sin)
    if len({t.dtype for t in floats}) != 1:
        raise ValueError(f"selected_attention wants one float dtype for q, keys, values and RoPE tables, got "
                         f"{sorted({str(t.dtype) for t in floats})}.")  # fmt: skip
    if candidates is not None:
        check_rows(candidates, q.device)
    if len({t.device for t in (*floats, rows)}) != 1:
        raise ValueError("selected_attention wants every tensor on one device.")


def _check_kernel_inputs(q, k_res, v_res, k_src, v_src, rows, cos, sin) -> None:
    """What the kernel needs beyond _check_inputs: a supported dtype, a power-of-two headdim, unit inner strides."""
    headdim = q.shape[1]
    if headdim < 16 or headdim > 256 or headdim & (headdim - 1):
        raise ValueError(f"The selected attention kernel supports power-of-2 headdims 16..256, got {headdim}.")
    if q.dtype not in _DROP_BITS:
        raise ValueError(f"The selected attention kernel takes float16, bfloat16 or float32, got {q.dtype}.")
    for name, t in (("q", q), ("k_res", k_res), ("v_res", v_res), ("k_src", k_src), ("v_src", v_src), ("cos", cos),
                    ("sin", sin)):  # fmt: skip
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in headdim (stride 1), got strides {t.stride()}.")
    if rows.stride(1) != 1:
        raise ValueError(f"rows must be contiguous in its last dim, got strides {rows.stride()}.")


def selected_attention_triton(
    q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates=None, scale: float | None = None,
    split_size: int | None = None, select_split: int | None = None, fused_merge: bool = attention.FUSED_MERGE_DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the kernel; same contract as selected_attention. split_size: resident keys per split (default:
    sparse_attention's choice for n_res + n_sel keys); select_split: selected tokens per split (default: one key
    block, SELECT_SPLIT_BLOCKS); fused_merge: the last program merges, else a second launch."""
    _check_inputs(q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates)
    _check_kernel_inputs(q, k_res, v_res, k_src, v_src, rows, cos, sin)
    nheads, headdim = q.shape
    nheads_kv, n_res, _ = k_res.shape
    n_sel = rows.shape[1]
    group = nheads // nheads_kv
    scale = 1.0 / math.sqrt(headdim) if scale is None else float(scale)
    out = torch.empty(nheads, 1, headdim, dtype=q.dtype, device=q.device)
    lse = torch.empty(nheads, 1, dtype=torch.float32, device=q.device)
    if n_res + n_sel == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    tiles = attention.default_tiles(group, q.dtype)
    split_n = attention._split_size(n_res + n_sel, nheads_kv, tiles.block_n, q.device, split_size)
    select_split_n = attention._split_size(n_sel, 1, tiles.block_n, q.device, select_split or SELECT_SPLIT_BLOCKS *
                                           tiles.block_n)  # fmt: skip
    res_splits = attention._cdiv(n_res, split_n)
    n_splits = res_splits + attention._cdiv(n_sel, select_split_n)
    o_part = torch.empty(nheads, n_splits, headdim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(nheads, n_splits, dtype=torch.float32, device=q.device)
    tickets = attention._tickets(q.device, nheads_kv) if fused_merge else None
    merge_m, merge_s = attention._merge_shape(group, tiles.block_m, n_splits, headdim)

    interpret = interpreting()
    kernel, merge_kernel = _triton_kernels(interpret)
    kernel[(nheads_kv, n_splits, 1)](
        q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, candidates.contiguous() if candidates is not None else rows,
        cos, sin, o_part, lse_part, out, lse,
        tickets if tickets is not None else lse,
        q.stride(0), k_res.stride(0), k_res.stride(1), v_res.stride(0), v_res.stride(1), k_src.stride(0),
        k_src.stride(1), v_src.stride(0), v_src.stride(1), rows.stride(0),
        cos.stride(0), out.stride(0),
        n_res, n_sel, res_splits, n_splits, split_n, select_split_n, scale * _LOG2E,
        GROUP=group, HEADDIM=headdim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        UPCAST=interpret or q.dtype == torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or interpret else "tf32", DROP_BITS=_DROP_BITS[q.dtype],
        HAS_CANDIDATES=candidates is not None,
        FUSED_MERGE=tickets is not None, MERGE_M=merge_m, MERGE_S=merge_s,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if tickets is None:
        merge_kernel[(attention._cdiv(nheads, merge_m),)](
            o_part, lse_part, out, lse, out.stride(0), out.stride(1), nheads, 1, n_splits,
            HEADDIM=headdim, MERGE_M=merge_m, MERGE_S=merge_s, num_warps=4,
        )  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------- reference


def selected_attention_reference(
    q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates=None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the selected rows gathered, their keys and the query rotated in their dtype (as the eager step
    and pack_rotate round them), appended to the resident keys, then sparse_attention_reference."""
    _check_inputs(q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates)
    if candidates is not None:
        rows = candidates[rows.long()]
    index = rows.long()[..., None].expand(-1, -1, q.shape[1])
    k_sel = _rotate(torch.gather(k_src, 1, index), cos, sin)  # (nheads_kv, n_sel, headdim)
    v_sel = torch.gather(v_src, 1, index)
    q_rot = _rotate(q, q_cos, q_sin)[:, None]  # (nheads, 1, headdim)
    k_all, v_all = torch.cat([k_res, k_sel], dim=1), torch.cat([v_res, v_sel], dim=1)
    return attention.sparse_attention_reference(q_rot, k_all, v_all, scale=scale)


# --------------------------------------------------------------------------------------------- public


def selected_attention(
    q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates=None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's attention over resident keys and selected stored tokens -> (out (nheads, 1, headdim), lse
    (nheads, 1)); shapes in the module's docstring. With candidates, rows index candidates, whose entries are the rows
    of k_src / v_src (a top-k over the candidates' scores gives rows so, without a gather). Rows are not
    bounds-checked. The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(q, k_res, k_src, rows):
        args = (q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates)
        return selected_attention_triton(*args, scale=scale)
    return selected_attention_reference(q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin, candidates, scale)
