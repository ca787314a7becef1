"""Token selection at a decode step: each KV head keeps its best retrieved tokens before attending.

Span retrieval brings back whole spans (``RetrievalConfig.budget`` tokens); a decode step then narrows
them per KV head to ``select_tokens`` by a cheap approximate score (DESIGN.md point 7):

- ``loki``: q.k in the first ``select_rank`` principal directions of the layer's pre-RoPE keys. The basis
  is fitted per layer and KV head on the document's own keys (the sinks and window at the first eviction,
  no calibration set) and saved with the store.
- ``sparq``: q.k on the ``select_rank`` largest components of the GQA group's query, tempered as SparQ does.

Both score pre-RoPE queries against pre-RoPE keys, as span retrieval does: a retrieved token's position
in the resident set is only known once the selection is made. The selected tokens keep document order, so
in ``compact`` and ``one_angle`` position modes every KV head lays its selection out on the same slots.

Shapes: queries (1, nheads, 1, headdim); keys, values (1, nheads_kv, n_retrieved, headdim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltri.kernels.lowrank_scores import basis_of_covariance, key_covariance, lowrank_scores, project_keys
from ltri.kernels.sparq_scores import sparq_scores
from ltri.kernels.topk_select import topk_tokens


@dataclass(frozen=True)
class TokenSelector:
    """How one layer narrows its retrieved tokens at a decode step."""

    method: str  # "loki" or "sparq"
    n_tokens: int  # tokens each KV head keeps
    rank: int  # dimensions the approximate scores use
    basis: torch.Tensor | None = None  # (nheads_kv, headdim, headdim) float32, loki only

    def scores(self, query: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Approximate scores (nheads_kv, n) float32 of keys (nheads_kv, n, headdim) for one query (1, nheads, 1,
        headdim); n_valid (nheads_kv,) int64: the keys past it are padding, scored -inf."""
        q = query[0, :, -1].contiguous()  # (nheads, headdim)
        rank = min(self.rank, q.shape[-1])
        if self.method == "sparq":
            return sparq_scores(q, keys if keys.stride(-1) == 1 else keys.contiguous(), rank, n_valid)
        keys_lowrank = project_keys(keys, self.basis, rank).contiguous()
        return lowrank_scores(q, keys_lowrank, self.basis, rank, n_valid)

    def best(self, query: torch.Tensor, keys: torch.Tensor, n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (nheads_kv, n_tokens) int64 of each KV head's best keys (nheads_kv, n, headdim), ascending (document
        order); with n_valid (nheads_kv,), padding ranks last, so it is chosen only when every valid key is."""
        return topk_tokens(self.scores(query, keys, n_valid), self.n_tokens, n_valid)

    def select(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """The n_tokens best retrieved tokens of each KV head, in document order.

        Returns keys, values (1, nheads_kv, n_tokens, headdim) and the chosen indices (nheads_kv, n_tokens)
        into the retrieved tokens; everything unchanged (indices None) when there are not more than n_tokens.
        """
        if keys.shape[2] <= self.n_tokens:
            return keys, values, None
        indices = self.best(query, keys[0])  # (nheads_kv, n_tokens)
        gather = indices[None, :, :, None].expand(1, -1, -1, keys.shape[3])
        return keys.gather(2, gather), values.gather(2, gather), indices


def fit_basis(key_parts: list[torch.Tensor]) -> torch.Tensor:
    """Loki's basis from pre-RoPE keys, each part (1, nheads_kv, n, headdim) -> (nheads_kv, headdim, headdim)."""
    return basis_of_covariance(keys_covariance(key_parts))


def keys_covariance(key_parts: list[torch.Tensor]) -> torch.Tensor:
    """What fit_basis fits, before its eigendecomposition (which waits for the device): (nheads_kv, headdim,
    headdim) float64 from key parts (1, nheads_kv, n, headdim)."""
    return key_covariance(torch.cat([part[0].float() for part in key_parts if part.shape[2]], dim=1))
