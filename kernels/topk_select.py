"""Top-k token selection from per-KV-head scores, respecting the number of valid keys of each head.

    scores  (nheads_kv, n_keys) float      higher is better
    n_valid (nheads_kv,) int               keys [0, n_valid[h]) of head h are real, the rest padding
    indices (nheads_kv, k) int64           ascending (document order)

torch.topk is fast enough here (one launch over nheads_kv * n_keys floats); no Triton kernel.
"""

from __future__ import annotations

import torch


def mask_invalid(scores: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
    """scores with keys at or beyond n_valid[h] set to -inf (a new tensor when n_valid is given)."""
    if n_valid is None:
        return scores
    keys = torch.arange(scores.shape[1], device=scores.device)
    return scores.masked_fill(keys[None, :] >= n_valid.to(scores.device)[:, None], float("-inf"))


def topk_tokens(scores: torch.Tensor, k: int, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k best keys per KV head, sorted ascending -> (nheads_kv, k) int64.

    Keys at or beyond n_valid[h] rank below every valid key. When k > n_valid[h], the last k - n_valid[h]
    indices of that row point at padding; because they are sorted, the first min(k, n_valid[h]) are the valid
    ones, so pass ``n_valid.clamp(max=k)`` on to sparse_attention with the gathered keys.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (nheads_kv, n_keys), got {tuple(scores.shape)}.")
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 0 and n_keys ({scores.shape[1]}), got {k}.")
    if n_valid is not None and n_valid.shape != (scores.shape[0],):
        raise ValueError(f"n_valid must have shape (nheads_kv,) = ({scores.shape[0]},), got {tuple(n_valid.shape)}.")
    top = torch.topk(mask_invalid(scores, n_valid), k, dim=1, sorted=False).indices
    return torch.sort(top, dim=1).values
