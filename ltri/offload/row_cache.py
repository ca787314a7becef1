"""Device copies of the rows a layer's last decode step retrieved, so that the next step reads them from HBM instead of
over PCIe.

A captured decode step reads its retrieved tokens' rows in place from pinned host memory (``offload.host_payloads``):
at the default 512-token budget that is 2 MB a layer and step over PCIe, 44 us a layer on the H100 at the link's rate,
about a tenth of a 128K decode step (``benchmarks/speed/NOTES.md`` step 40). Consecutive steps retrieve many of the
same spans (votes persist, shared votes carry over), so a layer keeps the last step's retrieved rows on the device:

    rows      (budget, 2, nheads_kv, headdim)  the rows, pre-RoPE, at their places in the last step's retrieved list
    incoming  (budget, 2, nheads_kv, headdim)  where this step writes its retrieved rows as it reads them
    slots     (n_rows + 1,) int32              each stored row's place in rows, -1 for none (the last entry scratch)
    held      (budget,) int64, count (1,)      the rows held, and how many
    hits      (2,) int64                       since the cache was made: retrieved rows found held, rows retrieved

``kernels.pack_rotate`` reads a retrieved row from ``rows`` when it has a slot and from the host rows otherwise, and
writes every retrieved row to ``incoming``; then ``refresh`` gives the step's rows their slots
(``kernels.cache_slots``) and copies ``incoming`` over ``rows``. Stored rows never change, so a slot stays right for
as long as its row is held; the cache lives as long as the captured step it belongs to (a rebind makes a new one).
A layer keeps one with ``MemoryConfig.row_cache`` (on by default) and no token selector. On an H100 at 128K
(8B-shaped model, random weights) 48% of the retrieved rows were found here and ``pack_rotate`` went from 44 to 25 us
a layer (``benchmarks/speed/NOTES.md`` step 43). Keeping the last four steps' rows instead found 48.1% against 47.8%
and a step no faster (step 45), so the cache holds one step.
"""

from __future__ import annotations

import torch

from ltri.kernels.cache_slots import refresh_slots


class RowCache:
    def __init__(
        self, budget: int, n_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        """budget: rows a step retrieves at most; n_rows: the stored rows a step may name (row ids below it)."""
        self.rows = torch.zeros(budget, *row_shape, dtype=dtype, device=device)
        self.incoming = torch.zeros_like(self.rows)
        self.slots = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=device)
        self.held = torch.zeros(budget, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)
        self.hits = torch.zeros(2, dtype=torch.long, device=device)

    def refresh(self, rows: torch.Tensor, n_retrieved: torch.Tensor) -> None:
        """After a step whose retrieved rows (budget,) (the first n_retrieved valid) were written to incoming: they
        become the rows held."""
        refresh_slots(self.slots, self.held, self.count, rows, n_retrieved, self.hits)
        self.rows.copy_(self.incoming)
