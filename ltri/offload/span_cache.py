"""One layer's least-recently-used cache of span payloads on the compute device, within a byte budget.

Eviction runs at the end of every get() and put_block() and never evicts the spans that call asked for or
inserted. So a request larger than the budget is still served whole, and the cache then holds it,
over budget, until a later call evicts it: those are the tensors the caller has just received, so
keeping them costs no memory the caller does not already hold.

Misses are read from the store given, anything with the span store's read_spans (the span store itself). A layer
that keeps its stored tokens in host rows reads them from there and does not use its cache
(``SpanMemory._load``); the cache serves the spans read from the store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Protocol

import torch


class PayloadSource(Protocol):
    def read_spans(
        self, layer: int, span_ids: Sequence[int], shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device
    ) -> list[torch.Tensor]: ...


class SpanCache:
    def __init__(self, store: PayloadSource, layer: int, byte_budget: int, device: torch.device | str) -> None:
        if byte_budget < 0:
            raise ValueError(f"byte_budget must be >= 0, got {byte_budget}")
        self.store = store
        self.layer = layer
        self.byte_budget = byte_budget
        self.device = torch.device(device)
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self.hits = 0  # distinct spans per get() found in the cache
        self.misses = 0  # distinct spans per get() read from the store

    def get(self, span_ids: Sequence[int], shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """The payloads of span_ids on the device, in the order asked; misses come from one store read.

        The tensors returned are the cached ones, not copies: read them, never modify them in place."""
        if len(span_ids) != len(shapes):
            raise ValueError(f"{len(span_ids)} span ids for {len(shapes)} shapes")
        wanted = dict(
            zip(map(int, span_ids), map(tuple, shapes), strict=True)
        )  # distinct ids, in the order first asked
        missing = []
        for span_id, shape in wanted.items():
            if span_id in self._entries:
                self._check_entry(span_id, shape, dtype)
                self._entries.move_to_end(span_id)
            else:
                missing.append(span_id)
        self.hits += len(wanted) - len(missing)
        self.misses += len(missing)
        if missing:
            payloads = self.store.read_spans(self.layer, missing, [wanted[i] for i in missing], dtype, self.device)
            for span_id, payload in zip(missing, payloads, strict=True):
                self._insert(span_id, payload)
        self._evict(protected=wanted.keys())
        return [self._entries[int(span_id)] for span_id in span_ids]

    def put_block(self, span_ids: Sequence[int], payloads: Sequence[torch.Tensor]) -> None:
        """Caches fresh payloads that are views of one block on the device, as they are (no copies): the block
        lives while any of them is cached, as the views that read_spans returns for a batch of misses do."""
        for span_id, payload in zip(span_ids, payloads, strict=True):
            self._insert(int(span_id), payload.detach())
        self._evict(protected={int(span_id) for span_id in span_ids})

    def nbytes(self) -> int:
        return self._nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, span_id: int) -> bool:
        return int(span_id) in self._entries

    def _insert(self, span_id: int, payload: torch.Tensor) -> None:
        old = self._entries.pop(span_id, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._entries[span_id] = payload
        self._nbytes += payload.nbytes

    def _evict(self, protected: Collection[int]) -> None:
        """Drops least recently used spans until within budget; stops at the first protected one,
        since every protected span was just used and so sits at the recent end."""
        while self._nbytes > self.byte_budget and self._entries:
            oldest = next(iter(self._entries))
            if oldest in protected:
                return
            self._nbytes -= self._entries.pop(oldest).nbytes

    def _check_entry(self, span_id: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        entry = self._entries[span_id]
        if entry.shape != shape or entry.dtype != dtype:
            raise ValueError(
                f"span {span_id} is cached as {tuple(entry.shape)} {entry.dtype}, asked as {shape} {dtype}"
            )
