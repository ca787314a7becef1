"""SparQ token scores: approximate attention from the r largest query components, per GQA group.

    q       (nheads, headdim)                decode queries (one position), in the same frame as k
    k       (nheads_kv, n_keys, headdim)     candidate keys
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

Triton: kernel 1 gathers the r columns of a block of keys and writes the group's logits plus each block's
log-sum-exp; torch reduces the block log-sum-exps per head (nheads * n_blocks floats); kernel 2 normalises and
sums over the group. Choosing idx and tau is done in torch on (nheads, headdim) floats.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton
from .topk_select import topk_tokens

__all__ = ["sparq_scores", "sparq_scores_reference", "selected_mass", "mean_value_reallocation", "topk_tokens"]

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_N = 64


# --------------------------------------------------------------------------------------------- kernels


def _logits_kernel(
    q_sel_ptr, idx_ptr, k_ptr, n_valid_ptr, logits_ptr, block_lse_ptr,
    stride_kh, stride_kn, n_keys, n_blocks, r,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_N_VALID: tl.constexpr,
):  # fmt: skip
    """logits[h, keys] = q_sel[h] . k[kv_head, keys, idx[kv_head]] for the group's heads h; block lse per head."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    comps = tl.arange(0, BLOCK_R)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    comp_ok = comps < r

    idx = tl.load(idx_ptr + kv_head * r + comps, mask=comp_ok, other=0)  # (BLOCK_R,)
    q_sel = tl.load(q_sel_ptr + heads[:, None] * r + comps[None, :], mask=head_ok[:, None] & comp_ok[None, :],
                    other=0.0)  # (BLOCK_G, BLOCK_R) float32, already divided by tau  # fmt: skip
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys
    k_off = kv_head.to(tl.int64) * stride_kh + keys[:, None].to(tl.int64) * stride_kn + idx[None, :]
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


def _group_probs_kernel(
    logits_ptr, lse_ptr, scores_ptr, n_keys,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """scores[kv_head, keys] = sum over the group's heads of exp(logits - lse); -inf where every logit is."""
    kv_head = tl.program_id(0)
    block = tl.program_id(1)
    group = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_in = keys < n_keys

    lse = tl.load(lse_ptr + heads, mask=head_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    off = heads[:, None].to(tl.int64) * n_keys + keys[None, :]
    logits = tl.load(logits_ptr + off, mask=head_ok[:, None] & key_in[None, :], other=float("-inf"))
    scores = tl.sum(tl.exp(logits - lse[:, None]), 0)  # (BLOCK_N,)
    valid = tl.max(logits, 0) > float("-inf")
    tl.store(scores_ptr + kv_head.to(tl.int64) * n_keys + keys, tl.where(valid, scores, float("-inf")), mask=key_in)


@functools.cache
def _triton_kernels(interpret: bool):
    """JIT wrappers of the kernels above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_logits_kernel), triton.jit(_group_probs_kernel)


# --------------------------------------------------------------------------------------------- query side


def _check_inputs(q: torch.Tensor, k: torch.Tensor, r: int, n_valid: torch.Tensor | None) -> None:
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


def sparq_scores_triton(q, k, r, n_valid=None) -> torch.Tensor:
    """Launch the two scoring kernels; same contract as sparq_scores."""
    _check_inputs(q, k, r, n_valid)
    if k.stride(2) != 1:
        raise ValueError(f"k must be contiguous in headdim (stride 1), got strides {k.stride()}: call .contiguous().")
    nheads = q.shape[0]
    nheads_kv, n_keys, _ = k.shape
    group = nheads // nheads_kv
    scores = torch.empty(nheads_kv, n_keys, dtype=torch.float32, device=q.device)
    if n_keys == 0:
        return scores
    idx, q_sel = sparq_query(q.float(), nheads_kv, r)
    idx, q_sel = idx.to(torch.int32).contiguous(), q_sel.contiguous()
    n_blocks = -(-n_keys // _BLOCK_N)
    logits = torch.empty(nheads, n_keys, dtype=torch.float32, device=q.device)
    block_lse = torch.empty(nheads, n_blocks, dtype=torch.float32, device=q.device)
    block_g = 1 << max(0, group - 1).bit_length()

    logits_kernel, probs_kernel = _triton_kernels(interpreting())
    logits_kernel[(nheads_kv, n_blocks)](
        q_sel, idx, k, n_valid if n_valid is not None else idx, logits, block_lse,
        k.stride(0), k.stride(1), n_keys, n_blocks, r,
        GROUP=group, BLOCK_G=block_g, BLOCK_R=max(16, 1 << (r - 1).bit_length()), BLOCK_N=_BLOCK_N,
        HAS_N_VALID=n_valid is not None, num_warps=4,
    )  # fmt: skip
    lse = torch.logsumexp(block_lse, dim=1)  # (nheads,)
    probs_kernel[(nheads_kv, n_blocks)](
        logits, lse, scores, n_keys, GROUP=group, BLOCK_G=block_g, BLOCK_N=_BLOCK_N, num_warps=4
    )
    return scores


def sparq_scores_reference(q, k, r, n_valid=None) -> torch.Tensor:
    """Plain torch: the contract the kernels must meet; float32 (float64 math and result for float64 inputs)."""
    _check_inputs(q, k, r, n_valid)
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


def sparq_scores(q: torch.Tensor, k: torch.Tensor, r: int, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """SparQ scores (nheads_kv, n_keys) float32: the group's summed approximate attention probabilities.

    q (nheads, headdim), k (nheads_kv, n_keys, headdim), r components per group (see the module docstring
    for the formula); -inf beyond n_valid. The Triton kernels on CUDA (or under TRITON_INTERPRET=1), the
    torch reference otherwise.
    """
    if use_triton(q, k):
        return sparq_scores_triton(q, k, r, n_valid)
    return sparq_scores_reference(q, k, r, n_valid)


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
