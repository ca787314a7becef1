"""SparQ token scores: approximate attention from the r largest query components, per GQA group.

    q       (nheads, headdim)                decode queries (one position), in the same frame as k
    k       (nheads_kv, n_keys, headdim)     candidate keys
    rows    (n_cand,) int32/int64, optional  candidates are k[:, rows] (n_keys below means n_cand; no gather)
    n_valid (nheads_kv,) int                 keys [0, n_valid[h]) of KV head h are real, the rest padding
    scores  (nheads_kv, n_keys) float32      in [0, group]; -inf at keys >= n_valid[h]

What is computed (SparQ, arXiv 2312.04985, step 1, adapted to GQA): for KV head g with query heads G(g),

    idx_g      = the r components i with the largest  sum_{h in G(g)} |q_h,i|      (shared by the group,
                 so one gather of r columns of K serves every head of the group)
    tau_h      = sqrt(headdim * sum_{i in idx_g} |q_h,i| / sum_i |q_h,i|)          (SparQ's temperature,
                 replacing sqrt(headdim): a partial dot product has a smaller spread than the full one)
    s_h[j]     = sum_{i in idx_g} q_h,i k_j,i / tau_h
    p_h        = softmax_j(s_h) over the valid keys
    scores[g, j] = sum_{h in G(g)} p_h[j]

The group's approximate attention probabilities are summed (not its logits): every head of the group reads
the same selected tokens, and summing probabilities picks the tokens that carry the most attention mass
across the group, whereas summed logits let a head with a flat distribution outvote a head that needs one
token. scores[g].sum() == group, so ``selected_mass`` (the mass on a selection / group) is SparQ's alpha for
``mean_value_reallocation``.

Triton, two launches: kernel 1 chooses idx and tau from the group's query (every program anew: (group, headdim)
floats), gathers the r columns of a block of keys and writes the group's logits plus each block's log-sum-exp;
kernel 2 reduces the heads' block log-sum-exps (nheads * n_blocks floats), normalises and sums over the group.
(Before, choosing idx and tau and reducing the block log-sum-exps were about fifteen torch launches around the two
kernels.)
"""

from __future__ import annotations

import functools

import torch

from . import check_rows, interpreting, use_triton
from .topk_select import topk_tokens

__all__ = ["sparq_scores", "sparq_scores_reference", "selected_mass", "mean_value_reallocation", "topk_tokens"]

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_N = 64
_BLOCK_B = 64  # block log-sum-exps a probabilities program reduces at a time


# --------------------------------------------------------------------------------------------- kernels


def _logits_kernel(
    q_ptr, k_ptr, rows_ptr, n_valid_ptr, logits_ptr, block_lse_ptr,
    stride_qh, stride_kh, stride_kn, n_keys, n_blocks, r,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEADDIM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_N_VALID: tl.constexpr, HAS_ROWS: tl.constexpr,
):  # fmt: skip
    """logits[h, keys] = q_sel[h] . k[kv_head, rows[keys], idx[kv_head]] for the group's heads h (rows[j] = j
    without HAS_ROWS); block lse per head. Every program chooses its group's components and temperatures itself
    (``_group_query``: a few KB of q)."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    comp_ok = tl.arange(0, BLOCK_R) < r

    idx, q_sel = _group_query(q_ptr, stride_qh, heads, head_ok, r, HEADDIM, BLOCK_R)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys
    rows = keys.to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + keys, mask=key_in, other=0).to(tl.int64)
    k_off = kv_head.to(tl.int64) * stride_kh + rows[:, None] * stride_kn + idx[None, :]
    k_sel = tl.load(k_ptr + k_off, mask=key_in[:, None] & comp_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.sum(q_sel[:, None, :] * k_sel[None, :, :], 2)  # (BLOCK_G, BLOCK_N)

    n_kv = n_keys
    if HAS_N_VALID:
        n_kv = tl.minimum(tl.load(n_valid_ptr + kv_head).to(tl.int32), n_keys)
    logits = tl.where((keys < n_kv)[None, :], logits, float("-inf"))
    out_off = heads[:, None].to(tl.int64) * n_keys + keys[None, :]
    tl.store(logits_ptr + out_off, logits, mask=head_ok[:, None] & key_in[None, :])

    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(logits - m_safe[:, None]), 1)
    lse = tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(block_lse_ptr + heads * n_blocks + block, lse, mask=head_ok)


def _group_query(q_ptr, stride_qh, heads, head_ok, r, HEADDIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """sparq_query in one program: idx (BLOCK_R,) int32, the r components with the largest summed |q| of the heads
    (BLOCK_G,) ascending (ties to the lower component, as topk_tokens), 0 past r; q_sel (BLOCK_G, BLOCK_R) float32,
    q[h, idx] / tau_h, 0 past r and outside the group (head_ok)."""
    dims = tl.arange(0, HEADDIM)
    q = tl.load(q_ptr + heads[:, None].to(tl.int64) * stride_qh + dims[None, :], mask=head_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    magnitude = tl.abs(q)  # (BLOCK_G, HEADDIM)
    summed = tl.sum(magnitude, 0)  # (HEADDIM,)
    tied_before = (summed[None, :] == summed[:, None]) & (dims[None, :] < dims[:, None])
    ahead = (summed[None, :] > summed[:, None]) | tied_before  # (HEADDIM, HEADDIM): component j ranks before i
    chosen = tl.sum(ahead.to(tl.int32), 1) < r  # (HEADDIM,): fewer than r components rank before it
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1  # its place in idx
    picks = chosen[None, :] & (slot[None, :] == tl.arange(0, BLOCK_R)[:, None])  # (BLOCK_R, HEADDIM) one-hot rows
    idx = tl.sum(tl.where(picks, dims[None, :], 0), 1)
    kept = tl.sum(tl.where(chosen[None, :], magnitude, 0.0), 1)  # (BLOCK_G,)
    total = tl.sum(magnitude, 1)
    ratio = tl.where(total > 0.0, kept / tl.maximum(total, 1.1754943508222875e-38), 1.0)  # float32's tiny
    tau = tl.sqrt(HEADDIM * tl.maximum(ratio, 1.1920928955078125e-07))  # float32's eps
    q_sel = tl.sum(tl.where(picks[None, :, :], q[:, None, :], 0.0), 2)  # (BLOCK_G, BLOCK_R)
    return idx, q_sel / tau[:, None]


def _group_probs_kernel(
    logits_ptr, block_lse_ptr, scores_ptr, n_keys, n_blocks,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """scores[kv_head, keys] = sum over the group's heads of exp(logits - lse); -inf where every logit is. Each
    program reduces the heads' block log-sum-exps (n_blocks a head) to their lse itself."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys

    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    for b0 in range(0, n_blocks, BLOCK_B):  # online log-sum-exp over the blocks
        at = b0 + tl.arange(0, BLOCK_B)
        part = tl.load(block_lse_ptr + heads[:, None] * n_blocks + at[None, :],
                       mask=head_ok[:, None] & (at < n_blocks)[None, :], other=float("-inf"))  # fmt: skip
        m_new = tl.maximum(m, tl.max(part, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(part - m_safe[:, None]), 1)
        m = m_new
    lse = tl.where(total > 0.0, m + tl.log(tl.where(total > 0.0, total, 1.0)), 0.0)  # 0: every logit is -inf
    off = heads[:, None].to(tl.int64) * n_keys + keys[None, :]
    logits = tl.load(logits_ptr + off, mask=head_ok[:, None] & key_in[None, :], other=float("-inf"))
    scores = tl.sum(tl.exp(logits - lse[:, None]), 0)  # (BLOCK_N,)
    valid = tl.max(logits, 0) > float("-inf")
    tl.store(scores_ptr + kv_head.to(tl.int64) * n_keys + keys, tl.where(valid, scores, float("-inf")), mask=key_in)


_GROUP_QUERY = _group_query  # the plain function; _triton_kernels binds its JIT wrapper


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrappers of the kernels above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _group_query
    import triton
    import triton.language

    tl = triton.language
    _group_query = triton.jit(_GROUP_QUERY)
    return triton.jit(_logits_kernel), triton.jit(_group_probs_kernel)


# --------------------------------------------------------------------------------------------- query side


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, r: int, n_valid: torch.Tensor | None, rows: torch.Tensor | None = None
) -> None:
    """Shape/dtype/device checks shared by the kernel and the reference paths."""
    if q.dim() != 2 or k.dim() != 3 or q.shape[1] != k.shape[2]:
        raise ValueError(f"sparq_scores wants q (nheads, headdim) and k (nheads_kv, n_keys, headdim), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}.")  # fmt: skip
    if k.shape[0] == 0 or q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"nheads ({q.shape[0]}) must be a multiple of nheads_kv ({k.shape[0]}).")
    if not 1 <= r <= q.shape[1]:
        raise ValueError(f"r must be between 1 and headdim ({q.shape[1]}), got {r}.")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}.")
    if n_valid is not None and (n_valid.shape != (k.shape[0],) or n_valid.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"n_valid must be an int32/int64 tensor of shape ({k.shape[0]},), "
                         f"got {n_valid.dtype} {tuple(n_valid.shape)}.")  # fmt: skip
    if rows is not None:
        check_rows(rows, k.device)


def sparq_query(q: torch.Tensor, nheads_kv: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's r components and the tempered queries on them.

    q (nheads, headdim) -> idx (nheads_kv, r) int64 ascending, q_sel (nheads, r) = q[h, idx] / tau_h in
    float32 (float64 for float64 q).
    """
    nheads, headdim = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    magnitude = q.to(compute).abs()  # (nheads, headdim)
    group_magnitude = magnitude.reshape(nheads_kv, -1, headdim).sum(dim=1)  # (nheads_kv, headdim)
    idx = topk_tokens(group_magnitude, r)
    idx_heads = idx.repeat_interleave(nheads // nheads_kv, dim=0)  # (nheads, r)
    kept = magnitude.gather(1, idx_heads).sum(dim=1)
    total = magnitude.sum(dim=1)
    ratio = torch.where(total > 0, kept / total.clamp_min(torch.finfo(compute).tiny), 1.0)
    tau = torch.sqrt(headdim * ratio.clamp_min(torch.finfo(compute).eps))  # (nheads,)
    return idx, q.to(compute).gather(1, idx_heads) / tau[:, None]


# --------------------------------------------------------------------------------------------- scores


def sparq_scores_triton(q, k, r, n_valid=None, rows=None) -> torch.Tensor:
    """Launch the two scoring kernels; same contract as sparq_scores."""
    _check_inputs(q, k, r, n_valid, rows)
    if k.stride(2) != 1:
        raise ValueError(f"k must be contiguous in headdim (stride 1), got strides {k.stride()}: call .contiguous().")
    nheads = q.shape[0]
    nheads_kv, n_keys, _ = k.shape
    if rows is not None:
        rows = rows.contiguous()
        n_keys = rows.shape[0]  # the candidates
    group = nheads // nheads_kv
    scores = torch.empty(nheads_kv, n_keys, dtype=torch.float32, device=q.device)
    if n_keys == 0:
        return scores
    headdim = q.shape[1]
    if headdim & (headdim - 1) or q.stride(1) != 1:
        raise ValueError(f"the SparQ kernels want a power-of-two headdim and q contiguous in it, got {tuple(q.shape)}.")
    n_blocks = -(-n_keys // _BLOCK_N)
    logits = torch.empty(nheads, n_keys, dtype=torch.float32, device=q.device)
    block_lse = torch.empty(nheads, n_blocks, dtype=torch.float32, device=q.device)
    block_g = 1 << max(0, group - 1).bit_length()

    logits_kernel, probs_kernel = _triton_kernels(interpreting())
    logits_kernel[(nheads_kv, n_blocks)](
        q, k, rows if rows is not None else k, n_valid if n_valid is not None else k, logits, block_lse,
        q.stride(0), k.stride(0), k.stride(1), n_keys, n_blocks, r,
        GROUP=group, BLOCK_G=block_g, HEADDIM=headdim, BLOCK_R=max(16, 1 << (r - 1).bit_length()),
        BLOCK_N=_BLOCK_N, HAS_N_VALID=n_valid is not None, HAS_ROWS=rows is not None, num_warps=4,
    )  # fmt: skip
    probs_kernel[(nheads_kv, n_blocks)](
        logits, block_lse, scores, n_keys, n_blocks, GROUP=group, BLOCK_G=block_g, BLOCK_N=_BLOCK_N,
        BLOCK_B=_BLOCK_B, num_warps=4,
    )  # fmt: skip
    return scores


def sparq_scores_reference(q, k, r, n_valid=None, rows=None) -> torch.Tensor:
    """Plain torch: the contract the kernels must meet; float32 (float64 math and result for float64 inputs)."""
    _check_inputs(q, k, r, n_valid, rows)
    if rows is not None:
        k = k[:, rows]  # the candidates, gathered (index_select would copy a strided view whole)
    nheads_kv, n_keys, _ = k.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    idx, q_sel = sparq_query(q, nheads_kv, r)
    k_sel = k.to(compute).gather(2, idx[:, None, :].expand(nheads_kv, n_keys, r))  # (nheads_kv, n_keys, r)
    logits = torch.einsum("hgr,hnr->hgn", q_sel.reshape(nheads_kv, -1, r), k_sel)  # (nheads_kv, group, n_keys)
    valid = torch.ones(nheads_kv, n_keys, dtype=torch.bool, device=k.device)
    if n_valid is not None:
        valid = torch.arange(n_keys, device=k.device)[None, :] < n_valid[:, None]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=2, keepdim=True)
    probs = torch.exp(logits - lse.masked_fill(lse == float("-inf"), 0.0))
    return probs.sum(dim=1).masked_fill(~valid, float("-inf"))


def sparq_scores(
    q: torch.Tensor, k: torch.Tensor, r: int, n_valid: torch.Tensor | None = None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """SparQ scores (nheads_kv, n_keys) float32: the group's summed approximate attention probabilities.

    q (nheads, headdim), k (nheads_kv, n_keys, headdim), r components per group (see the module docstring
    for the formula); -inf beyond n_valid. With rows (n_cand,) the candidates are k[:, rows], read in place:
    the result is (nheads_kv, n_cand), n_valid counts candidates, and rows are not bounds-checked. The Triton
    kernels on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    """
    if use_triton(q, k):
        return sparq_scores_triton(q, k, r, n_valid, rows)
    return sparq_scores_reference(q, k, r, n_valid, rows)


# --------------------------------------------------------------------------------------------- reallocation


def selected_mass(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Approximate attention mass on the selected keys, averaged over the group -> (nheads_kv,) float32.

    scores (nheads_kv, n_keys) from sparq_scores; indices (nheads_kv, k) from topk_tokens (padding indices,
    whose score is -inf, count zero). This is SparQ's alpha for mean_value_reallocation.
    """
    finite = torch.where(torch.isfinite(scores), scores, 0.0)
    total = finite.sum(dim=1)
    picked = finite.gather(1, indices).sum(dim=1)
    return torch.where(total > 0, picked / total.clamp_min(torch.finfo(torch.float32).tiny), 1.0).float()


def mean_value_reallocation(out_selected: torch.Tensor, mass: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:
    """SparQ's output: alpha * out_selected + (1 - alpha) * v_mean, alpha = approximate mass on the selection.

    out_selected (nheads, q_len, headdim): attention over the selected keys only; mass: alpha per KV head
    (nheads_kv,) as selected_mass gives it, or per query head (nheads,) or (nheads, q_len); v_mean
    (nheads_kv, headdim): mean of the values over all candidate keys. Returns out_selected's shape and dtype.
    """
    nheads, q_len, headdim = out_selected.shape
    nheads_kv = v_mean.shape[0]
    if v_mean.shape != (nheads_kv, headdim) or nheads_kv == 0 or nheads % nheads_kv:
        raise ValueError(f"v_mean must be (nheads_kv, headdim) with nheads ({nheads}) a multiple of nheads_kv, "
                         f"got {tuple(v_mean.shape)}.")  # fmt: skip
    group = nheads // nheads_kv
    alpha = mass.float()
    if alpha.shape[0] == nheads_kv and nheads_kv != nheads:
        alpha = alpha.repeat_interleave(group, dim=0)
    if alpha.shape[0] != nheads:
        raise ValueError(f"mass must have nheads_kv ({nheads_kv}) or nheads ({nheads}) rows, got {tuple(mass.shape)}.")
    alpha = alpha.reshape(nheads, -1, 1)  # (nheads, 1 or q_len, 1)
    mean = v_mean.float().repeat_interleave(group, dim=0)[:, None, :]  # (nheads, 1, headdim)
    return (alpha * out_selected.float() + (1.0 - alpha) * mean).to(out_selected.dtype)
