"""Chunks of all layers cut into spans together, once the forward over the chunk has passed every layer.

Each layer's prefill chunk is segmented by its own attention (``ltri.spans``). One call per layer is
hundreds of tiny GPU launches; the layers of one forward wait here instead and are cut in one batched
call (``ltri.span_batch.segment_many``), each launch doing the work of every layer. Nothing reads a
chunk's spans before the next forward (they wait in the window, unindexed), so the spans and
everything after them are exactly what cutting each layer at once would give.

A layer hands in its block's head-averaged attention (n, n) and a callback that takes the
Segmentation. Blocks are cut together when they share n and the segmentation settings. A layer that indexes
its spans by their most attended keys also hands in its keys and per-KV-head attention: the index vectors of
every such block are then chosen in one pass too (``ltri.span_vectors.top_attended_keys_of_blocks``, one device
sync for all layers instead of one or two a layer), and the callback gets them with the Segmentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ltri.config import SpanConfig
from ltri.span_batch import segment_many
from ltri.span_vectors import IndexVectors, SpanKeys, top_attended_keys_of_blocks
from ltri.spans import Segmentation

MAX_WAITING_BYTES = 1 << 30  # attention held while waiting; past it the waiting blocks are cut at once


@dataclass(frozen=True)
class WaitingBlock:
    attention: torch.Tensor  # (n, n) head-averaged causal attention of the chunk
    spans: SpanConfig
    finish: Callable[[Segmentation, IndexVectors | None], None]
    keys: torch.Tensor | None = None  # (nheads_kv, n, headdim): index vectors are chosen here
    head_attention: torch.Tensor | None = None  # (nheads_kv, n, n), with keys

    def group(self) -> tuple:
        config = self.spans
        shape = (self.attention.shape[0], self.attention.device)
        return (*shape, config.theta, config.min_len, config.max_len, config.nms_iou)


class DeferredSegmentation:
    def __init__(self, max_waiting_bytes: int = MAX_WAITING_BYTES, batched: bool | None = None) -> None:
        """batched: as segment_many's (None: batched except on the CPU, where the loop is faster)."""
        self.max_waiting_bytes = max_waiting_bytes
        self.batched = batched
        self.waiting: list[WaitingBlock] = []
        self.waiting_bytes = 0

    def add(
        self,
        attention: torch.Tensor,
        spans: SpanConfig,
        finish: Callable[[Segmentation, IndexVectors | None], None],
        keys: torch.Tensor | None = None,
        head_attention: torch.Tensor | None = None,
    ) -> None:
        """A block to cut later: attention (n, n); finish(segmentation, index_vectors) gets its spans, and their most
        attended keys (max_vectors at most, ``ltri.span_vectors.vectors_per_span``) when keys (nheads_kv, n, headdim)
        and head_attention (nheads_kv, n, n) are given (else None)."""
        self.waiting.append(WaitingBlock(attention, spans, finish, keys, head_attention))
        self.waiting_bytes += attention.nbytes
        if self.waiting_bytes > self.max_waiting_bytes:
            self.flush()

    def flush(self) -> None:
        """Cut every waiting block (one batched call per group of like blocks) and hand out the spans, in the
        order the blocks came."""
        waiting, self.waiting, self.waiting_bytes = self.waiting, [], 0
        groups: dict[tuple, list[int]] = {}
        for number, block in enumerate(waiting):
            groups.setdefault(block.group(), []).append(number)
        segmentations: list[Segmentation | None] = [None] * len(waiting)
        vectors: list[IndexVectors | None] = [None] * len(waiting)
        for numbers in groups.values():
            config = waiting[numbers[0]].spans
            attention = torch.stack([waiting[number].attention for number in numbers])  # (n_blocks, n, n)
            cut = segment_many(
                attention, config.theta, config.min_len, config.max_len, config.nms_iou, batched=self.batched
            )
            for number, segmentation in zip(numbers, cut, strict=True):
                segmentations[number] = segmentation
            with_keys = [number for number in numbers if waiting[number].keys is not None]
            blocks = [SpanKeys(waiting[i].keys, waiting[i].head_attention, segmentations[i]) for i in with_keys]
            for number, made in zip(with_keys, top_attended_keys_of_blocks(blocks, config.max_vectors), strict=True):
                vectors[number] = made
        for block, segmentation, made in zip(waiting, segmentations, vectors, strict=True):
            block.finish(segmentation, made)
