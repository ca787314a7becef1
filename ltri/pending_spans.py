"""Spans already cut in a layer's local window but not yet moved to the store, oldest first.

A chunk is segmented while its attention is fresh; its spans wait here, with their index vectors,
until their tokens leave the window. Vocabulary: n_pending spans; n_vectors index vectors, each
owned by one pending span; dim is headdim (key vectors) or 2 * headdim (Quest bounds).
"""

from __future__ import annotations

import torch


class PendingSpans:
    def __init__(self) -> None:
        self.lengths = torch.empty(0, dtype=torch.long)  # (n_pending,) tokens per span, CPU
        self.vectors: torch.Tensor | None = None  # (nheads_kv, n_vectors, dim)
        self.owner = torch.empty(0, dtype=torch.long)  # (n_vectors,) pending index of each vector's span, ascending

    @property
    def count(self) -> int:
        return self.lengths.numel()

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def add(self, lengths: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor) -> None:
        """Spans that follow the pending ones: lengths (n,), vectors (nheads_kv, v, dim), owner (v,) in 0..n-1."""
        lengths, owner = (
            torch.cat([lengths.long(), owner.to(lengths.device).long()]).cpu().split([len(lengths), len(owner)])
        )
        self.owner = torch.cat([self.owner, owner + self.count])  # one wait for the device brought both
        self.lengths = torch.cat([self.lengths, lengths])
        self.vectors = vectors if self.vectors is None else torch.cat([self.vectors, vectors], dim=1)

    def spans_to_leave(self, window_tokens: int, n_window: int) -> int:
        """How many of the oldest spans can leave a window of window_tokens and keep at least n_window."""
        if self.count == 0:
            return 0
        remaining = window_tokens - torch.cumsum(self.lengths, dim=0)
        return int((remaining >= n_window).sum())

    def pop(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Remove the n oldest spans; returns their lengths (n,), vectors (nheads_kv, v, dim), owner (v,).

        Vectors are kept in span order (owner ascending), so the leaving ones are a prefix: slices, no
        boolean indexing of device tensors (a host sync)."""
        n_leaving = int((self.owner < n).sum())  # owner is on the CPU
        taken = (self.lengths[:n], self.vectors[:, :n_leaving], self.owner[:n_leaving])
        self.lengths = self.lengths[n:]
        self.vectors = self.vectors[:, n_leaving:]
        self.owner = self.owner[n_leaving:] - n
        return taken

    def state(self) -> dict:
        vectors = None if self.vectors is None else self.vectors.cpu()
        return {"lengths": self.lengths, "vectors": vectors, "owner": self.owner}

    def load_state(self, state: dict, device) -> None:
        self.lengths = state["lengths"]
        self.vectors = None if state["vectors"] is None else state["vectors"].to(device)
        self.owner = state["owner"]
