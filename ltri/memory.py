"""Memory policies: what one layer keeps of the text between chunks, behind one interface.

A policy is asked for its resident set before a chunk attends (it sees the chunk's queries, so a
retrieval policy can choose by them) and is handed the chunk's keys and values afterwards.
keys, values: (batch, nheads_kv, seqlen, headdim), before RoPE; positions: (seqlen,) in the text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ltri.positions import Layout
from ltri.token_buffer import TokenBuffer


@dataclass(frozen=True)
class ResidentSet:
    """The tokens a chunk attends to besides itself, in attention order, as pieces (sinks, retrieved
    spans, window...) that the attention concatenates once, together with the chunk."""

    key_parts: tuple[torch.Tensor, ...]  # each (batch, nheads_kv, n_piece, headdim)
    value_parts: tuple[torch.Tensor, ...]  # each (batch, nheads_kv, n_piece, headdim)
    positions: torch.Tensor  # (n_resident,) positions in the text
    layout: Layout  # which of them are sinks, retrieved and window

    @property
    def keys(self) -> torch.Tensor:
        """(batch, nheads_kv, n_resident, headdim)"""
        return torch.cat(self.key_parts, dim=2)

    @property
    def values(self) -> torch.Tensor:
        return torch.cat(self.value_parts, dim=2)


class LayerMemory(ABC):
    """What one layer remembers of the text."""

    @abstractmethod
    def resident(self, queries: torch.Tensor) -> ResidentSet | None:
        """The resident set for a chunk with queries (batch, nheads, q_len, headdim); None when empty."""

    @abstractmethod
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, chunk_attention=None) -> None:
        """Take the chunk's pre-RoPE keys and values after it attended.

        chunk_attention: (nheads_kv, q_len, q_len) the chunk's causal self-attention, when
        wants_chunk_attention(q_len) said so.
        """

    def end_forward(self) -> None:  # noqa: B027 - most policies have nothing to finish
        """Called when a forward has passed every layer: finish work the layers do together."""

    def store_deferred(self) -> None:  # noqa: B027 - most policies store nothing
        """Write to the span store what only memory holds (a save needs it there)."""

    def release(self) -> None:  # noqa: B027 - most policies hold nothing outside torch's allocators
        """Give back at once what the memory holds outside torch's allocators (pinned host rows); the memory is not
        read after this (its session is closed or reset)."""

    def wants_chunk_attention(self, q_len: int) -> bool:
        """Whether append needs the chunk's self-attention (span segmentation reads it)."""
        return False

    @abstractmethod
    def resident_tokens(self) -> int:
        """Tokens this layer holds in attention memory now."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of keys and values this layer holds on its device."""

    @abstractmethod
    def state(self) -> dict:
        """What a saved session needs to rebuild this memory (CPU tensors; stored spans excluded)."""

    @abstractmethod
    def load_state(self, state: dict, device) -> None:
        """Rebuild from state() on device."""


class BufferedMemory(LayerMemory):
    """A policy whose resident set is one TokenBuffer (max_tokens: its bound, if it has one)."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.buffer = TokenBuffer(max_tokens)

    def resident(self, queries: torch.Tensor) -> ResidentSet | None:
        if self.buffer.length == 0:
            return None
        layout = Layout(n_window=self.buffer.length)
        return ResidentSet((self.buffer.keys(),), (self.buffer.values(),), self.buffer.positions(), layout)

    def append(self, keys, values, positions, chunk_attention=None) -> None:
        self.buffer.append(keys, values, positions)

    def resident_tokens(self) -> int:
        return self.buffer.length

    def nbytes(self) -> int:
        return self.buffer.nbytes()

    def state(self) -> dict:
        return {"buffer": self.buffer.state()}

    def load_state(self, state: dict, device) -> None:
        self.buffer.load_state(state["buffer"], device)


class FullMemory(BufferedMemory):
    """Keeps every token: ltri then computes exactly the model's own attention."""


class StreamingMemory(BufferedMemory):
    """Keeps the first n_sink tokens and the last n_window tokens (StreamingLLM-like)."""

    def __init__(self, n_sink: int, n_window: int) -> None:
        # Between a piece's append and the trim the buffer holds sinks + window + one piece.
        super().__init__(max_tokens=n_sink + 2 * n_window)
        self.n_sink = n_sink
        self.n_window = n_window

    def append(self, keys, values, positions, chunk_attention=None) -> None:
        # Append in window-sized pieces so that the buffer never holds more than sinks + 2 windows.
        for start in range(0, keys.shape[2], self.n_window):
            end = start + self.n_window
            self.buffer.append(keys[:, :, start:end], values[:, :, start:end], positions[start:end])
            self.buffer.keep(self.n_sink, self.n_window)
