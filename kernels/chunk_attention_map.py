"""A prefill chunk's causal attention among its own tokens, averaged over each KV head's query heads: what span
segmentation reads to find the attention's local triangles.

    query   (nheads, q_len, headdim)            rotated; nheads = nheads_kv * group
    keys    (nheads_kv, q_len, headdim)         rotated, the chunk's own keys (any strides, headdim contiguous)
    map     (nheads_kv, q_len, q_len) float32   row i: the mean over the group's heads of query i's softmax over
                                                the chunk's keys j <= i; zeros above the diagonal

The torch reference builds (nheads, q_len, q_len) float32 scores (a float32 batched matmul, a mask, a softmax, a
mean over the group): in a 128K prefill on the H100 (Llama-3-8B shape, 2048-token chunks) that took 76 ms of kernel
time per chunk over the 32 layers (``ltri.chunk_self_attention`` in
``benchmarks/speed/results/e2e_h100_7e52b02_profile_prefill_profile_131072.txt``), a sixth of the chunk's time.

The kernel gives each program a block of query rows of one KV head, the group's heads stacked in one tile (so one
dot serves the whole group), and makes two passes over the keys up to the block's last row: the first keeps each
row's running maximum and normaliser, the second writes the group's mean probabilities. Scores stay in registers;
the map is written once, its zeros above the diagonal included. Half-precision inputs go to the tensor cores with
float32 accumulation (their products are exact in float32, as in the reference); float32 inputs use exact float32
dots. On the H100 (bf16, 32 query heads over 8 KV heads, headdim 128, 2048-token chunk) the kernel took 0.49 ms
a layer against 2.34 ms for the reference (``benchmarks/speed/results/attention_chunk_map_h100.json``): 10.5% of
the copy bandwidth for the bytes it moves, far from that floor (155 MB at the run's 3.0 TB/s: 0.05 ms); the tiles
are untuned.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch


def _chunk_map_kernel(
    q_ptr, k_ptr, out_ptr, q_len, group, scale_log2,
    stride_q_h, stride_q_t, stride_k_h, stride_k_t, stride_out_h, stride_out_t,
    HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Rows [first, first + BLOCK_M) of one KV head's map. Tile rows are (head g, row m) at g * BLOCK_M + m."""
    kv_head = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BLOCK_M
    packed = tl.arange(0, GROUP_BLOCK * BLOCK_M)
    in_group = packed // BLOCK_M  # g: the query head within the group
    row = first + packed % BLOCK_M  # the query's place in the chunk
    dim = tl.arange(0, HEADDIM)
    head = kv_head * group + in_group
    real = (in_group < group) & (row < q_len)
    q = tl.load(q_ptr + head[:, None] * stride_q_h + row[:, None] * stride_q_t + dim[None, :], mask=real[:, None],
                other=0.0)  # fmt: skip
    k_head = k_ptr + kv_head * stride_k_h
    end = tl.minimum(first + BLOCK_M, q_len)  # no row of the block sees a key at or past end
    row_max = tl.full((GROUP_BLOCK * BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((GROUP_BLOCK * BLOCK_M,), tl.float32)
    for start in range(0, end, BLOCK_N):
        s = _scores(q, k_head, start, row, q_len, stride_k_t, scale_log2, HEADDIM, BLOCK_N, DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, axis=1))  # finite from the first block on: key 0 is in every row
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), axis=1)
        row_max = new_max
    weight = tl.where(in_group < group, 1.0 / (row_sum * group), 0.0)  # softmax's normaliser and the group mean
    out_row = first + tl.arange(0, BLOCK_M)
    out_rows = out_ptr + kv_head * stride_out_h + out_row.to(tl.int64)[:, None] * stride_out_t
    for start in range(0, q_len, BLOCK_N):
        column = start + tl.arange(0, BLOCK_N)
        if start < end:
            s = _scores(q, k_head, start, row, q_len, stride_k_t, scale_log2, HEADDIM, BLOCK_N, DOT_PRECISION)
            p = tl.exp2(s - row_max[:, None]) * weight[:, None]  # (GROUP_BLOCK * BLOCK_M, BLOCK_N)
            mean = tl.sum(tl.reshape(p, (GROUP_BLOCK, BLOCK_M, BLOCK_N)), axis=0)
        else:
            mean = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # above the diagonal
        tl.store(out_rows + column[None, :], mean, mask=(out_row < q_len)[:, None] & (column < q_len)[None, :])


def _scores(q, k_head, start, row, q_len, stride_k_t, scale_log2, HEADDIM: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Scores (rows, BLOCK_N) in log2 units of keys [start, start + BLOCK_N); -inf past each row's place."""
    column = start + tl.arange(0, BLOCK_N)
    dim = tl.arange(0, HEADDIM)
    k = tl.load(k_head + column.to(tl.int64)[:, None] * stride_k_t + dim[None, :], mask=(column < q_len)[:, None],
                other=0.0)  # fmt: skip
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    return tl.where((column[None, :] <= row[:, None]) & (column < q_len)[None, :], s, float("-inf"))


_SCORES = _scores  # the plain function; _triton_kernels binds _scores to its JIT wrapper


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _scores
    import triton
    import triton.language

    tl = triton.language
    _scores = triton.jit(_SCORES)  # the kernel calls the helper by this global name
    return triton.jit(_chunk_map_kernel, do_not_specialize=["q_len"])


def _check_inputs(query: torch.Tensor, keys: torch.Tensor) -> None:
    if query.dim() != 3 or keys.dim() != 3 or query.shape[1:] != keys.shape[1:] or query.shape[0] % keys.shape[0]:
        raise ValueError(f"chunk_attention_map wants query (nheads, q_len, headdim) and keys (nheads_kv, q_len, "
                         f"headdim) with nheads a multiple of nheads_kv, got {tuple(query.shape)} and "
                         f"{tuple(keys.shape)}.")  # fmt: skip


def chunk_attention_map_reference(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch in float32: scores, the causal mask, softmax, the mean over each group."""
    _check_inputs(query, keys)
    nheads, q_len, headdim = query.shape
    nheads_kv = keys.shape[0]
    grouped = query.float().view(nheads_kv, nheads // nheads_kv, q_len, headdim)
    scores = torch.einsum("hgqd,hkd->hgqk", grouped, keys.float()) * scale
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu(1)
    scores.masked_fill_(future, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


class MapTiles(NamedTuple):
    """Launch shape of the kernel (benchmarks/speed/attention.py sweeps it)."""

    block_m: int  # query rows per head in a program (the tile stacks the group's heads: GROUP_BLOCK x block_m)
    block_n: int  # keys per step
    num_warps: int


def default_tiles(group: int, dtype: torch.dtype) -> MapTiles:
    """About 128 stacked rows (64 in float32), at least 16 per head. Half precision with at most 32 rows a head (GQA
    groups of 4 or more) on 4 warps: for a bf16 Llama-3-8B layer 0.317 ms against 0.485 ms on 8 warps (H100, 2048
    tokens, ``benchmarks/speed/results/attention_h100_b97257e.json``), 142 registers a thread, no spills
    (``kernel_resources_sm90.jsonl``); the other shapes on 8 warps, not tuned by timing."""
    half = dtype != torch.float32
    block_m = max(16, (128 if half else 64) // _group_block(group))
    return MapTiles(block_m, 64 if half else 32, 4 if half and block_m <= 32 else 8)


def _group_block(group: int) -> int:
    return 1 << (group - 1).bit_length()


def chunk_attention_map_triton(
    query: torch.Tensor, keys: torch.Tensor, scale: float, tiles: MapTiles | None = None
) -> torch.Tensor:
    """The kernel's launch; same contract as chunk_attention_map. tiles: default_tiles' unless given."""
    _check_inputs(query, keys)
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16) or keys.dtype != query.dtype:
        raise ValueError(f"The chunk attention map kernel takes one of float32, float16 or bfloat16, got "
                         f"{query.dtype} and {keys.dtype}.")  # fmt: skip
    nheads, q_len, headdim = query.shape
    nheads_kv = keys.shape[0]
    if headdim < 16 or headdim & (headdim - 1):
        raise ValueError(f"The chunk attention map kernel wants a power-of-two headdim of at least 16, got {headdim}.")
    if query.stride(2) != 1 or keys.stride(2) != 1:
        query, keys = query.contiguous(), keys.contiguous()
    group = nheads // nheads_kv
    block_m, block_n, warps = tiles or default_tiles(group, query.dtype)
    out = torch.empty(nheads_kv, q_len, q_len, dtype=torch.float32, device=query.device)
    exact = query.dtype == torch.float32 or interpreting()
    _triton_kernels(interpreting())[(-(-q_len // block_m), nheads_kv)](
        query, keys, out, q_len, group, scale * math.log2(math.e),
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        HEADDIM=headdim, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_BLOCK=_group_block(group),
        DOT_PRECISION="ieee" if exact else "tf32", num_warps=warps,
    )  # fmt: skip
    return out


def chunk_attention_map(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The chunk's causal attention map averaged over each KV head's query heads: see the module's docstring.
    The Triton kernel on CUDA (or under TRITON_INTERPRET=1) for float32, float16 and bfloat16, else the reference."""
    if query.dtype in (torch.float32, torch.float16, torch.bfloat16) and use_triton(query, keys):
        return chunk_attention_map_triton(query, keys, scale)
    return chunk_attention_map_reference(query, keys, scale)


__all__ = ["chunk_attention_map", "chunk_attention_map_reference", "chunk_attention_map_triton", "MapTiles"]
