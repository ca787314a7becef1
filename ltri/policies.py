"""One memory per layer for the policy a config names."""

from __future__ import annotations

from ltri.config import LtriConfig
from ltri.memory import FullMemory, LayerMemory, StreamingMemory
from ltri.offload.span_store import SpanStore


def make_memories(config: LtriConfig, n_layers: int, store: SpanStore | None) -> list[LayerMemory]:
    """store: where the ``ltri`` policy puts span payloads (the other policies need none)."""
    memory = config.memory
    if memory.policy == "full":
        return [FullMemory() for _ in range(n_layers)]
    if memory.policy == "streaming":
        return [StreamingMemory(memory.n_sink, memory.n_window) for _ in range(n_layers)]
    if memory.policy == "ltri":
        from ltri.deferred_segmentation import DeferredSegmentation
        from ltri.offload.host_payloads import HostRowsSwitch
        from ltri.shared_votes import SharedVotes
        from ltri.span_memory import SpanMemory

        if store is None:
            raise ValueError("the ltri policy needs a span store")
        cache_bytes = config.retrieval.cache_mb * 2**20 // n_layers
        shared, deferred, host_rows = SharedVotes(n_layers), DeferredSegmentation(), HostRowsSwitch()
        return [
            SpanMemory(layer, memory, config.spans, config.retrieval, store, cache_bytes, shared, deferred, host_rows)
            for layer in range(n_layers)
        ]
    raise ValueError(f"unknown memory policy {memory.policy!r}")
