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
A layer keeps one with ``MemoryConfig.row_cache`` (on by default). On an H100 at 128K (8B-shaped model, random
weights, no token selector) 48% of the retrieved rows were found here and ``pack_rotate`` went from 44 to 25 us a layer
(``benchmarks/speed/NOTES.md`` step 43). Keeping the last four steps' rows instead found 48.1% against 47.8% and a
step no faster (step 45), so the cache holds one step. With a trained model on real text (the bundled SmolLM2, on a
CPU) 95-99% of each step's rows were found while it continued the text, with a token selector too, but 47-76% while
it answered a question (56-61% at the default budget; ``benchmarks/speed/cache_overlap.py``, NOTES.md step 52).

With a token selector each KV head attends to its own select_tokens rows, so each head has its own slots, held rows
and count (``heads``), and place i of ``rows`` holds, in head h's part, head h's i-th row of the last step:

    slots     (heads, n_rows + 1) int32    4 bytes a stored token and KV head (a 128K layer of 8 heads: 4 MB)
    held      (heads, budget) int64, count (heads,)
    hits                                   counting a row once a head

(a selection of 1024 tokens from 4096 reads 4.2 MB of rows a layer over PCIe at 128K, an 8B-shaped layer; on an H100
with random weights 12.8% of each head's selected rows were found here, with the bundled SmolLM2 on a CPU 95-98%
while continuing a text and 47-54% while answering: NOTES.md steps 51-52).

The same class keeps what a selector's scores read of the last step's candidates (the retrieved rows, shared by the
heads): Loki's projections (``offload.projected_keys``' rows, (nheads_kv, rank) a token: ``kernels.lowrank_scores``
reads them from here where it can and writes every candidate's row to ``incoming``; 1 MB a 128K layer of an 8B shape
at a 4096-token budget) or SparQ's keys ((nheads_kv, headdim) a token, gathered by ``kernels.cached_gather`` into
``incoming``; 8 MB there).
"""

from __future__ import annotations

import torch

from ltri.kernels import CachedRows
from ltri.kernels.cache_slots import refresh_slots


class RowCache:
    def __init__(
        self, budget: int, n_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        heads: int | None = None,
    ) -> None:  # fmt: skip
        """budget: rows a step retrieves at most; n_rows: the stored rows a step may name (row ids below it); heads:
        None where the KV heads share the step's rows, else their count, each with rows of its own (a token
        selection's: slots, held and count per head)."""
        by_head = () if heads is None else (heads,)
        self.rows = torch.zeros(budget, *row_shape, dtype=dtype, device=device)
        self.incoming = torch.zeros_like(self.rows)
        self.slots = torch.full((*by_head, n_rows + 1), -1, dtype=torch.int32, device=device)
        self.held = torch.zeros(*by_head, budget, dtype=torch.long, device=device)
        self.count = torch.zeros(heads or 1, dtype=torch.long, device=device)
        self.hits = torch.zeros(2, dtype=torch.long, device=device)

    def read_and_refilled(self) -> CachedRows:
        """The cache as a kernel that reads candidates' rows takes it: its slots, the rows held, incoming to refill."""
        return CachedRows(self.slots, self.rows, self.incoming)

    def refresh(self, rows: torch.Tensor, n_retrieved: torch.Tensor) -> None:
        """After a step whose retrieved rows (budget,) or, per head, (heads, budget) (the first n_retrieved valid)
        were written to incoming: they become the rows held."""
        refresh_slots(self.slots, self.held, self.count, rows, n_retrieved, self.hits)
        self.rows.copy_(self.incoming)
