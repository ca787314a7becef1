"""Device copies of the rows a layer's last decode steps retrieved, so that the next step reads them from HBM instead
of over PCIe.

A captured decode step reads its retrieved tokens' rows in place from pinned host memory (``offload.host_payloads``):
at the default 512-token budget that is 2 MB a layer and step over PCIe, 44 us a layer on the H100 at the link's rate,
about a tenth of a 128K decode step (``benchmarks/speed/NOTES.md`` step 40). Consecutive steps retrieve many of the
same spans (votes persist, shared votes carry over), so a layer keeps the rows its last S steps retrieved on the
device, a segment of the cache a step (S = ``MemoryConfig.row_cache_steps``):

    rows      (S * budget, 2, nheads_kv, headdim)  the rows, pre-RoPE: segment s at rows[s * budget:], each row at its
                                                   place in that step's retrieved list
    incoming  (budget, 2, nheads_kv, headdim)      where this step writes its retrieved rows as it reads them
    slots     (n_rows + 1,) int32                  each stored row's place in rows (its newest copy), -1 for none
    held      (S, budget) int64, counts (S,)       the rows each segment holds, and how many
    turn      (1,) int64                           the segment of the oldest step held, the next to be filled
    hits      (2,) int64                           since the cache was made: retrieved rows found held, rows retrieved

``kernels.pack_rotate`` reads a retrieved row from ``rows`` when it has a slot and from the host rows otherwise, and
writes every retrieved row to ``incoming``; then ``refresh`` copies ``incoming`` over the oldest segment and moves
the slots (``kernels.cache_slots``: that segment's rows lose theirs unless a newer step retrieved them again, the
step's rows get theirs). Stored rows never change, so a slot stays right for as long as its row is held; the cache
lives as long as the captured step it belongs to (a rebind makes a new one). A layer keeps one with
``MemoryConfig.row_cache`` (on by default) and no token selector. On an H100 at 128K (8B-shaped model, random
weights) a cache of one step found 48% of the retrieved rows and ``pack_rotate`` went from 44 to 25 us a layer
(``benchmarks/speed/NOTES.md`` step 43).
"""

from __future__ import annotations

import torch

from ltri.kernels.cache_slots import refresh_slots


class RowCache:
    def __init__(
        self, budget: int, n_steps: int, n_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype,
        device: torch.device,
    ) -> None:  # fmt: skip
        """budget: rows a step retrieves at most; n_steps: the last steps whose rows are held; n_rows: the stored
        rows a step may name (row ids below it)."""
        self.rows = torch.zeros(n_steps * budget, *row_shape, dtype=dtype, device=device)
        self.incoming = torch.zeros(budget, *row_shape, dtype=dtype, device=device)
        self.slots = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=device)
        self.held = torch.zeros(n_steps, budget, dtype=torch.long, device=device)
        self.counts = torch.zeros(n_steps, dtype=torch.long, device=device)
        self.turn = torch.zeros(1, dtype=torch.long, device=device)
        self.hits = torch.zeros(2, dtype=torch.long, device=device)

    def refresh(self, rows: torch.Tensor, n_retrieved: torch.Tensor) -> None:
        """After a step whose retrieved rows (budget,) (the first n_retrieved valid) were written to incoming: they
        replace the oldest step's rows."""
        segments = self.rows.view(self.held.shape[0], self.incoming.shape[0], *self.incoming.shape[1:])
        segments.index_copy_(0, self.turn, self.incoming[None])
        refresh_slots(self.slots, self.held, self.counts, self.turn, rows, n_retrieved, self.hits)
