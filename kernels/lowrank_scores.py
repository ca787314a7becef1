"""Loki token scores: queries and keys projected on the first principal components of the keys.

    keys         (nheads_kv, n, headdim)          pre-RoPE keys of the document (to fit the basis)
    basis        (nheads_kv, headdim, headdim)    float32, column c = c-th principal direction
    keys_lowrank (nheads_kv, n_keys, >= rank)     keys @ basis[..., :rank], stored with the spans
    rows         (n_cand,) int32/int64, optional  candidates keys_lowrank[:, rows] read in place; n_keys = n_cand below
    cache        CachedRows, optional             (with rows in the token-row layout) device copies of some rows'
                                                  projections: a candidate with a slot is read there, and every
                                                  candidate's row, as read, written to cache.out at its place
    q            (nheads, headdim)                decode queries (one position), pre-RoPE like the keys
    scores       (nheads_kv, n_keys) float32      -inf at keys >= n_valid[h]

Choices (Loki, arXiv 2406.02542, leaves them open):
- The basis is the *centered* PCA of the keys (eigenvectors of the covariance about the key mean), sorted by
  decreasing variance. Top-k only compares keys against each other for one query, and the key mean adds the
  same q . mean to every key's score, so it carries no ranking information; the uncentered second moment would
  spend a component (often the first: LLM keys have a large common offset) on that constant. Keys are
  projected without subtracting the mean (scores differ from the centered ones by a per-query constant).
- The score of a KV head is the sum of its GQA group's raw (unscaled) low-rank scores:
  sum_{h in group} (q_h B_r) . (k B_r) = ((sum_h q_h) B_r) . (k B_r), with B_r the first rank columns.
  No 1/sqrt(headdim): a positive factor does not change the top-k.

The Triton kernel computes one block of keys of one KV head per program (the group's query sum and its
projection are recomputed per program: headdim * rank multiply-adds, far below the key reads). Candidates read
through rows from whole token rows (``offload.projected_keys``' layout: each token's (nheads_kv, width) projections
side by side, width a power of 2) go to a second kernel that scores every KV head of a block of candidates in one
program, reading each candidate's whole row (nheads_kv x width values, 256 bytes at 8 heads of 16 in bf16) with one
load: from pinned host memory over PCIe the first kernel's reads of one head's 32 bytes a row moved 7.7 GB/s on the
H100 (``benchmarks/speed/results/host_selection_h100_c796a0e.json``, ``loki_projected``), whole rows 25.1 GB/s on
another H100 host, 5x faster than gathering the candidates' keys there (``host_selection_h100_04b2a3b.json``).
With a cache (``offload.row_cache``, the rows the last step's candidates had) the whole-row kernel reads a candidate's
row from HBM where the cache holds it, and passes every candidate's row on to the cache's incoming buffer.
"""

from __future__ import annotations

import functools

import torch

from . import CachedRows, check_rows, interpreting, use_triton
from .cached_gather import cached_gather_reference
from .topk_select import topk_tokens

__all__ = [
    "pca_basis", "key_covariance", "basis_of_covariance", "project_keys", "lowrank_scores", "lowrank_scores_reference",
    "topk_tokens",
]  # fmt: skip

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_N = 128
_ROWS_BLOCK_N = 64  # candidates a whole-row program scores (its rows: 64 x nheads_kv x width values)


# --------------------------------------------------------------------------------------------- kernel


def _lowrank_kernel(
    q_ptr, basis_ptr, klow_ptr, rows_ptr, n_valid_ptr, scores_ptr,
    stride_qh, stride_bh, stride_bd, stride_bc, stride_kh, stride_kn, stride_sh,
    n_keys, rank,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """scores[kv_head, keys] = ((sum of the group's q) @ basis[:, :rank]) . keys_lowrank[rows[keys], :rank]
    (rows[j] = j without HAS_ROWS)."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEADDIM)
    comps = tl.arange(0, BLOCK_R)
    comp_ok = comps < rank

    heads = kv_head * GROUP + group
    q = tl.load(q_ptr + heads[:, None] * stride_qh + dims[None, :], mask=(group < GROUP)[:, None], other=0.0)
    q_sum = tl.sum(q.to(tl.float32), 0)  # (HEADDIM,)
    b_off = kv_head.to(tl.int64) * stride_bh + dims[:, None] * stride_bd + comps[None, :] * stride_bc
    basis = tl.load(basis_ptr + b_off, mask=comp_ok[None, :], other=0.0)  # (HEADDIM, BLOCK_R)
    q_low = tl.sum(q_sum[:, None] * basis, 0)  # (BLOCK_R,)

    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys
    rows = keys.to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + keys, mask=key_in, other=0).to(tl.int64)
    k_off = kv_head.to(tl.int64) * stride_kh + rows[:, None] * stride_kn + comps[None, :]
    k_low = tl.load(klow_ptr + k_off, mask=key_in[:, None] & comp_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
    scores = tl.sum(k_low.to(tl.float32) * q_low[None, :], 1)

    n_kv = n_keys
    if HAS_N_VALID:
        n_kv = tl.minimum(tl.load(n_valid_ptr + kv_head).to(tl.int32), n_keys)
    scores = tl.where(keys < n_kv, scores, float("-inf"))
    tl.store(scores_ptr + kv_head.to(tl.int64) * stride_sh + keys, scores, mask=key_in)


def _lowrank_rows_kernel(
    q_ptr, basis_ptr, klow_ptr, rows_ptr, n_valid_ptr, scores_ptr, cache_slots_ptr, cache_rows_ptr, cache_out_ptr,
    stride_qh, stride_bh, stride_bd, stride_bc, stride_kn, stride_sh,
    n_keys, rank, nheads_kv,
    GROUP: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_H: tl.constexpr, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_CACHE: tl.constexpr,
):  # fmt: skip
    """scores[:, keys] of every KV head for a block of candidates: column c of a token row is head c // WIDTH's
    component c % WIDTH; the row klow[rows[key]] (nheads_kv * WIDTH values, contiguous) is read with one load.
    HAS_CACHE: from cache_rows[slot] instead where cache_slots[rows[key]] = slot >= 0 (the same row layout), and every
    candidate's row written to cache_out[key]."""
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H * WIDTH)
    head = cols // WIDTH
    comp = cols % WIDTH
    col_ok = (head < nheads_kv) & (comp < rank)  # the components past rank score 0

    q_low = tl.zeros([BLOCK_H * WIDTH], dtype=tl.float32)  # each column's head's summed query on its component
    for d0 in tl.static_range(0, HEADDIM, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        b_off = head[None, :].to(tl.int64) * stride_bh + dims[:, None] * stride_bd + comp[None, :] * stride_bc
        basis = tl.load(basis_ptr + b_off, mask=col_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_H * WIDTH)
        q_sum = tl.zeros([BLOCK_D, BLOCK_H * WIDTH], dtype=tl.float32)
        for g in tl.static_range(GROUP):
            q_off = (head[None, :] * GROUP + g) * stride_qh + dims[:, None]
            q_sum += tl.load(q_ptr + q_off, mask=col_ok[None, :], other=0.0).to(tl.float32)
        q_low += tl.sum(q_sum * basis, 0)

    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys
    rows = tl.load(rows_ptr + keys, mask=key_in, other=0).to(tl.int64)
    in_row = (head < nheads_kv)[None, :]
    stored = key_in
    if HAS_CACHE:
        slot = tl.load(cache_slots_ptr + rows, mask=key_in, other=-1).to(tl.int64)
        cached = key_in & (slot >= 0)
        stored = key_in & (slot < 0)
    k_low = tl.load(klow_ptr + rows[:, None] * stride_kn + cols[None, :], mask=stored[:, None] & in_row, other=0.0)
    if HAS_CACHE:
        cache_off = tl.where(cached, slot, 0)[:, None] * stride_kn + cols[None, :]
        copies = tl.load(cache_rows_ptr + cache_off, mask=cached[:, None] & in_row, other=0.0)
        k_low = tl.where(cached[:, None], copies, k_low)
        tl.store(cache_out_ptr + keys.to(tl.int64)[:, None] * stride_kn + cols[None, :], k_low,
                 mask=key_in[:, None] & in_row)  # fmt: skip
    products = k_low.to(tl.float32) * q_low[None, :]  # (BLOCK_N, BLOCK_H * WIDTH)
    scores = tl.sum(tl.reshape(products, (BLOCK_N, BLOCK_H, WIDTH)), 2)  # (BLOCK_N, BLOCK_H)

    heads = tl.arange(0, BLOCK_H)
    head_in = heads < nheads_kv
    n_kv = tl.zeros([BLOCK_H], dtype=tl.int32) + n_keys
    if HAS_N_VALID:
        n_kv = tl.minimum(tl.load(n_valid_ptr + heads, mask=head_in, other=0).to(tl.int32), n_keys)
    scores = tl.where(keys[:, None] < n_kv[None, :], scores, float("-inf"))
    s_off = heads[None, :].to(tl.int64) * stride_sh + keys[:, None]
    tl.store(scores_ptr + s_off, scores, mask=key_in[:, None] & head_in[None, :])


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrappers of the kernels above (per head, whole rows); the only place triton is imported (keyed by
    interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_lowrank_kernel), triton.jit(_lowrank_rows_kernel)


# --------------------------------------------------------------------------------------------- basis


def pca_basis(keys: torch.Tensor) -> torch.Tensor:
    """Principal directions of each KV head's keys (nheads_kv, n, headdim) -> (nheads_kv, headdim, headdim).

    float32, columns sorted by decreasing variance about the key mean, each column's largest entry positive
    (so that the same keys always give the same basis).
    """
    return basis_of_covariance(key_covariance(keys))


def key_covariance(keys: torch.Tensor) -> torch.Tensor:
    """Each KV head's key covariance about the key mean: keys (nheads_kv, n, headdim) -> (nheads_kv, headdim,
    headdim) float64. A few kernels with no host sync; ``basis_of_covariance`` makes pca_basis of it."""
    if keys.dim() != 3 or keys.shape[1] == 0:
        raise ValueError(f"A key basis wants keys (nheads_kv, n, headdim) with n >= 1, got {tuple(keys.shape)}.")
    x = keys.double()
    x = x - x.mean(dim=1, keepdim=True)
    return x.transpose(1, 2) @ x / keys.shape[1]


def basis_of_covariance(covariance: torch.Tensor) -> torch.Tensor:
    """pca_basis from key_covariance's matrices (nheads_kv, headdim, headdim): an eigendecomposition, which waits
    for the device (about 11 ms for 8 heads of 128 on an H100, benchmarks/speed/NOTES.md step 22)."""
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    vectors = vectors.flip(-1)
    peak = vectors.abs().argmax(dim=1, keepdim=True)  # (nheads_kv, 1, headdim)
    signs = torch.sign(vectors.gather(1, peak))
    return (vectors * torch.where(signs == 0, 1.0, signs)).float().contiguous()


def _check_basis(basis: torch.Tensor, nheads_kv: int, headdim: int, rank: int) -> None:
    if basis.shape != (nheads_kv, headdim, headdim):
        raise ValueError(f"basis must be (nheads_kv, headdim, headdim) = ({nheads_kv}, {headdim}, {headdim}), "
                         f"got {tuple(basis.shape)}.")  # fmt: skip
    if not 1 <= rank <= headdim:
        raise ValueError(f"rank must be between 1 and headdim ({headdim}), got {rank}.")


def project_keys(keys: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """keys (nheads_kv, n, headdim) on the first rank components -> (nheads_kv, n, rank) in keys' dtype."""
    if keys.dim() != 3:
        raise ValueError(f"keys must be (nheads_kv, n, headdim), got {tuple(keys.shape)}.")
    _check_basis(basis, keys.shape[0], keys.shape[2], rank)
    return torch.matmul(keys.float(), basis[:, :, :rank].to(keys.device)).to(keys.dtype)


# --------------------------------------------------------------------------------------------- scores


def _check_cache(keys_lowrank: torch.Tensor, rows: torch.Tensor | None, cache: CachedRows) -> None:
    if rows is None or not reads_whole_rows(keys_lowrank):
        raise ValueError("lowrank_scores reads a cache only for candidates (rows) of token rows read whole.")
    nheads_kv, _, width = keys_lowrank.shape
    cache.check((nheads_kv, width), rows.shape[0], keys_lowrank, "lowrank_scores", "projections")


def _check_inputs(q, keys_lowrank, basis, rank, n_valid, rows=None, cache=None) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference paths."""
    if q.dim() != 2 or keys_lowrank.dim() != 3:
        raise ValueError(f"lowrank_scores wants q (nheads, headdim) and keys_lowrank (nheads_kv, n_keys, rank), "
                         f"got {tuple(q.shape)} and {tuple(keys_lowrank.shape)}.")  # fmt: skip
    nheads_kv = keys_lowrank.shape[0]
    if nheads_kv == 0 or q.shape[0] % nheads_kv != 0:
        raise ValueError(f"nheads ({q.shape[0]}) must be a multiple of nheads_kv ({nheads_kv}).")
    _check_basis(basis, nheads_kv, q.shape[1], rank)
    if keys_lowrank.shape[2] < rank:
        raise ValueError(f"keys_lowrank has {keys_lowrank.shape[2]} components, fewer than rank {rank}.")
    if not (q.device == keys_lowrank.device == basis.device):
        raise ValueError("q, keys_lowrank and basis must be on one device.")
    if n_valid is not None and (n_valid.shape != (nheads_kv,) or n_valid.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"n_valid must be an int32/int64 tensor of shape ({nheads_kv},), "
                         f"got {n_valid.dtype} {tuple(n_valid.shape)}.")  # fmt: skip
    if rows is not None:
        check_rows(rows, keys_lowrank.device)
    if cache is not None:
        _check_cache(keys_lowrank, rows, cache)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def lowrank_scores_triton(q, keys_lowrank, basis, rank, n_valid=None, rows=None, cache=None) -> torch.Tensor:
    """Launch the scoring kernel; same contract as lowrank_scores."""
    _check_inputs(q, keys_lowrank, basis, rank, n_valid, rows, cache)
    nheads, headdim = q.shape
    nheads_kv, n_keys, _ = keys_lowrank.shape
    if rows is not None:
        rows = rows.contiguous()
        n_keys = rows.shape[0]  # the candidates
    if headdim & (headdim - 1) or headdim < 16:
        raise ValueError(f"The low-rank score kernel supports power-of-2 headdims from 16, got {headdim}.")
    if basis.dtype != torch.float32:
        raise ValueError(f"basis must be float32 (as pca_basis returns it), got {basis.dtype}.")
    for name, t in (("q", q), ("keys_lowrank", keys_lowrank)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}: .contiguous() it.")
    scores = torch.empty(nheads_kv, n_keys, dtype=torch.float32, device=q.device)
    if n_keys == 0:
        return scores
    group = nheads // nheads_kv
    per_head, whole_rows = _triton_kernels(interpreting())
    if rows is not None and reads_whole_rows(keys_lowrank):
        cached = cache if cache is not None else (rows, keys_lowrank, keys_lowrank)  # unread without a cache
        whole_rows[(-(-n_keys // _ROWS_BLOCK_N),)](
            q, basis, keys_lowrank, rows, n_valid if n_valid is not None else scores, scores, *cached,
            q.stride(0), *basis.stride(), keys_lowrank.stride(1), scores.stride(0), n_keys, rank, nheads_kv,
            GROUP=group, HEADDIM=headdim, BLOCK_H=_next_pow2(nheads_kv), WIDTH=keys_lowrank.shape[2],
            BLOCK_D=min(32, headdim), BLOCK_N=_ROWS_BLOCK_N, HAS_N_VALID=n_valid is not None,
            HAS_CACHE=cache is not None, num_warps=4,
        )  # fmt: skip
        return scores
    per_head[(nheads_kv, -(-n_keys // _BLOCK_N))](
        q, basis, keys_lowrank, rows if rows is not None else scores, n_valid if n_valid is not None else scores,
        scores,
        q.stride(0), *basis.stride(), keys_lowrank.stride(0), keys_lowrank.stride(1), scores.stride(0),
        n_keys, rank,
        GROUP=group, HEADDIM=headdim, BLOCK_G=_next_pow2(group), BLOCK_R=max(16, _next_pow2(rank)),
        BLOCK_N=_BLOCK_N, HAS_N_VALID=n_valid is not None, HAS_ROWS=rows is not None, num_warps=4,
    )  # fmt: skip
    return scores


def reads_whole_rows(keys_lowrank: torch.Tensor) -> bool:
    """Whether keys_lowrank (nheads_kv, n_keys, width) is a view of token rows (n_keys, nheads_kv, width) laid side by
    side, width a power of 2: the layout whose candidates the whole-row kernel reads a row at a time."""
    nheads_kv, _, width = keys_lowrank.shape
    dense = keys_lowrank.stride(2) == 1 and (keys_lowrank.stride(0) == width or nheads_kv == 1)
    return dense and keys_lowrank.stride(1) == nheads_kv * width and width & (width - 1) == 0


def lowrank_scores_reference(q, keys_lowrank, basis, rank, n_valid=None, rows=None, cache=None) -> torch.Tensor:
    """Plain torch: the contract the kernel must meet; float32 (float64 math and result for float64 inputs)."""
    _check_inputs(q, keys_lowrank, basis, rank, n_valid, rows, cache)
    if cache is not None:  # candidates with a slot read from the cache; every one written, as read, to cache.out
        keys_lowrank = cached_gather_reference(keys_lowrank.transpose(0, 1), rows, cache).transpose(0, 1)
    elif rows is not None:
        keys_lowrank = keys_lowrank[:, rows]  # the candidates, gathered (index_select would copy a strided view whole)
    nheads_kv = keys_lowrank.shape[0]
    compute = torch.promote_types(q.dtype, torch.float32)
    q_sum = q.to(compute).reshape(nheads_kv, -1, q.shape[1]).sum(dim=1)  # (nheads_kv, headdim)
    q_low = torch.einsum("hd,hdr->hr", q_sum, basis[:, :, :rank].to(compute))  # (nheads_kv, rank)
    scores = torch.einsum("hnr,hr->hn", keys_lowrank[:, :, :rank].to(compute), q_low)
    if n_valid is not None:
        keys = torch.arange(scores.shape[1], device=scores.device)
        scores = scores.masked_fill(keys[None, :] >= n_valid[:, None], float("-inf"))
    return scores


def lowrank_scores(
    q: torch.Tensor,
    keys_lowrank: torch.Tensor,
    basis: torch.Tensor,
    rank: int,
    n_valid: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    cache: CachedRows | None = None,
) -> torch.Tensor:
    """Loki scores (nheads_kv, n_keys) float32: the GQA group's summed low-rank q.k, -inf beyond n_valid.

    q (nheads, headdim); keys_lowrank (nheads_kv, n_keys, >= rank) from project_keys; basis from pca_basis.
    With rows (n_cand,) the candidates are keys_lowrank[:, rows], read in place: the result is (nheads_kv,
    n_cand), n_valid counts candidates, and rows are not bounds-checked. With a cache (rows given, keys_lowrank a
    view of token rows, ``reads_whole_rows``), a candidate whose slot is set is read from the cache's copy, and
    every candidate's row is written to cache.out (a row past the valid candidates too: what the caller's refresh
    ignores). The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    """
    if use_triton(q, keys_lowrank, basis):
        return lowrank_scores_triton(q, keys_lowrank, basis, rank, n_valid, rows, cache)
    return lowrank_scores_reference(q, keys_lowrank, basis, rank, n_valid, rows, cache)
