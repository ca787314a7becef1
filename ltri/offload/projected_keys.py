"""Loki's projections of a layer's stored keys, in pinned host rows beside the tokens' own (``HostPayloads``).

A decode step with the ``loki`` selector scores every retrieved token by its key's projection on the first
``rank`` principal directions (``TokenSelector.scored_keys``). Gathering the whole keys over PCIe to project
them reads 2 KB a token for 8 KV heads of 128 in bf16 (benchmarks/speed/NOTES.md step 28); the projection is
fixed once the basis is, 256 bytes a token at rank 16. So each token's projection is kept when the token is
stored, and the step's scores read the retrieved tokens' projections in place.

    rows  (max_tokens, nheads_kv, rank)  stored token t's keys @ basis[:, :, :rank] at row t (the host rows'
                                         row), in the model dtype, as ``project_keys`` rounds them

The rows follow the host rows: ``catch_up`` projects the host rows' tokens they lack (read where the host
rows are, on the device), so that they may start after the host rows did (a store reopened without a basis).
"""

from __future__ import annotations

import torch

from ltri.kernels.lowrank_scores import project_keys
from ltri.offload.host_payloads import HostPayloads, HostRows

CATCH_UP_TOKENS = 16384  # host-row tokens projected a batch when the projections catch up


class ProjectedKeys:
    """basis (nheads_kv, headdim, headdim) float32 on the device the rows are read on; rank: components kept."""

    def __init__(self, basis: torch.Tensor, rank: int, dtype: torch.dtype, max_tokens: int = 0) -> None:
        nheads_kv, headdim, _ = basis.shape
        self.basis = basis
        self.rank = rank
        # the same tokens a locked piece as the host rows' (2 x headdim values a head)
        self.rows = HostRows((nheads_kv, rank), dtype, basis.device, max_tokens, lock_scale=rank / (2 * headdim))

    @property
    def length(self) -> int:
        return self.rows.length

    def catch_up(self, payloads: HostPayloads, stored_keys: torch.Tensor | None = None) -> None:
        """Project the tokens payloads holds past length. stored_keys (nheads_kv, n, headdim): the last n tokens
        payloads took, where the caller still has them (projected from there, not read back)."""
        missing = payloads.length - self.length
        if stored_keys is not None and stored_keys.shape[1] == missing:
            self.append(stored_keys)
            return
        view = payloads.device_view()  # (max_tokens, 2, nheads_kv, headdim), read in stream order after its copies
        for start in range(self.length, payloads.length, CATCH_UP_TOKENS):
            stop = min(start + CATCH_UP_TOKENS, payloads.length)
            self.append(view[start:stop, 0].transpose(0, 1))

    def append(self, keys: torch.Tensor) -> None:
        """keys (nheads_kv, n, headdim) of the next n stored tokens, on any device."""
        keys = keys.to(self.basis.device)
        self.rows.append_rows(project_keys(keys, self.basis, self.rank).transpose(0, 1))  # (n, nheads_kv, rank)

    def scored(self) -> torch.Tensor:
        """The projections as TokenSelector.scores reads them: (nheads_kv, max_tokens, rank) on the device, an alias
        of the host rows on CUDA (rows past length must not be read)."""
        return self.rows.device_view().transpose(0, 1)

    def close(self) -> None:
        self.rows.close()
