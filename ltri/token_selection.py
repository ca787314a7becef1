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

    @property
    def scored_width(self) -> int | None:
        """Components a stored key's scored form keeps (Loki's rank), None where it is the key itself (SparQ)."""
        if self.method != "loki":
            return None
        return min(self.rank, self.basis.shape[1])

    def scored_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """What the scores read of keys (nheads_kv, n, headdim): Loki's projection (nheads_kv, n, rank) in keys'
        dtype, fixed per key once the basis is (so it may be kept with the stored tokens); SparQ's keys themselves."""
        if self.method == "sparq":
            return keys
        return project_keys(keys, self.basis, self.scored_width)

    def scores(
        self, query: torch.Tensor, scored: torch.Tensor, n_valid: torch.Tensor | None = None, rows=None, cache=None
    ) -> torch.Tensor:
        """Approximate scores (nheads_kv, n) float32 for one query (1, nheads, 1, headdim) of the keys whose
        scored_keys are scored (nheads_kv, n, d); with rows (n,), of scored[:, rows], read in place. n_valid
        (nheads_kv,) int64: the keys past it are padding, scored -inf. cache (loki, with rows of stored token rows):
        device copies of some rows' projections, read where they are held and refilled
        (``ltri.kernels.CachedRows``)."""
        q = query[0, :, -1].contiguous()  # (nheads, headdim)
        if rows is None and scored.stride(-1) != 1:  # with rows, scored may be whole host rows: never copied
            scored = scored.contiguous()
        if self.method == "sparq":
            if cache is not None:
                raise ValueError("SparQ's scores read the keys themselves: no cache of projections serves them.")
            return sparq_scores(q, scored, min(self.rank, q.shape[-1]), n_valid, rows)
        return lowrank_scores(q, scored, self.basis, self.scored_width, n_valid, rows, cache)

    def best(
        self, query: torch.Tensor, scored: torch.Tensor, n_valid: torch.Tensor | None = None, rows=None, cache=None
    ) -> torch.Tensor:
        """Indices (nheads_kv, n_tokens) int64 of each KV head's best keys (as scores takes them), ascending
        (document order); with n_valid (nheads_kv,), padding ranks last, so it is chosen only when every valid
        key is."""
        return topk_tokens(self.scores(query, scored, n_valid, rows, cache), self.n_tokens, n_valid)

    def select(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, stored=None):
        """The n_tokens best retrieved tokens of each KV head, in document order.

        stored: the retrieved tokens' scored_keys where they are kept, (scored (nheads_kv, n_rows, d), rows (n,));
        else they are made from keys. Returns keys, values (1, nheads_kv, n_tokens, headdim) and the chosen
        indices (nheads_kv, n_tokens) into the retrieved tokens; everything unchanged (indices None) when there
        are not more than n_tokens.
        """
        if keys.shape[2] <= self.n_tokens:
            return keys, values, None
        scored, rows = stored if stored is not None else (self.scored_keys(keys[0]), None)
        indices = self.best(query, scored, rows=rows)  # (nheads_kv, n_tokens)
        gather = indices[None, :, :, None].expand(1, -1, -1, keys.shape[3])
        return keys.gather(2, gather), values.gather(2, gather), indices


def fit_basis(key_parts: list[torch.Tensor]) -> torch.Tensor:
    """Loki's basis from pre-RoPE keys, each part (1, nheads_kv, n, headdim) -> (nheads_kv, headdim, headdim)."""
    return basis_of_covariance(keys_covariance(key_parts))


def keys_covariance(key_parts: list[torch.Tensor]) -> torch.Tensor:
    """What fit_basis fits, before its eigendecomposition (which waits for the device): (nheads_kv, headdim,
    headdim) float64 from key parts (1, nheads_kv, n, headdim)."""
    return key_covariance(torch.cat([part[0].float() for part in key_parts if part.shape[2]], dim=1))
