"""A transformers ``Cache`` whose layers are ltri memory policies.

The model's attention layers call ``update`` with the chunk's keys and values; ltri's attention
function does the real work (it needs the queries to pick the resident set), so ``update`` passes
the chunk through unchanged. The cache reports the sizes transformers asks for: tokens seen and, for
masks, the resident length with ``kv_offset`` = tokens no longer resident.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ltri.memory import LayerMemory


class LtriCacheLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, memory: LayerMemory, cache: LtriCache) -> None:
        super().__init__()
        self.memory = memory
        self._owner = weakref.ref(cache)  # a strong one would make a cycle: a closed session's memories would
        self.is_initialized = True  # wait for the garbage collector, pinned host rows included

    @property
    def owner(self) -> LtriCache:
        return self._owner()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.owner.tokens_seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        resident = self.memory.resident_tokens()
        return resident + query_length, self.owner.tokens_seen - resident

    def reset(self) -> None:
        raise NotImplementedError("an ltri cache is not reset in place: start a new Session or feed again")


class LtriCache(Cache):
    """Per-layer memories plus the count of tokens seen (positions of the next chunk start there)."""

    def __init__(self, memories: list[LayerMemory]) -> None:
        self.tokens_seen = 0
        super().__init__(layers=[LtriCacheLayer(memory, self) for memory in memories])

    def memory(self, layer_idx: int) -> LayerMemory:
        return self.layers[layer_idx].memory

    def memories(self) -> list[LayerMemory]:
        return [layer.memory for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def advance(self, n_tokens: int) -> None:
        """Record that a forward over n_tokens finished in every layer."""
        for memory in self.memories():
            memory.end_forward()
        self.tokens_seen += n_tokens


def cache_argument_name(model) -> str:
    """The model forward's name for the cache: ``past_key_values`` in transformers 5.17, ``cache`` later."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
