"""Frozen configuration, one dataclass per concern; invariants are checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ltri.errors import LtriError

MEMORY_POLICIES = ("full", "streaming")
POSITION_MODES = ("compact", "true")


@dataclass(frozen=True)
class MemoryConfig:
    """What each layer keeps between chunks.

    policy: ``full`` keeps every token (the exactness reference); ``streaming`` keeps the first
        ``n_sink`` tokens and the last ``n_window`` tokens (StreamingLLM-like).
    n_sink: attention-sink tokens kept from the start of the text.
    n_window: most recent tokens kept (the local window).
    """

    policy: str = "full"
    n_sink: int = 64
    n_window: int = 2048

    def __post_init__(self) -> None:
        if self.policy not in MEMORY_POLICIES:
            raise LtriError(f"Unknown memory policy {self.policy!r}: choose one of {', '.join(MEMORY_POLICIES)}.")
        if self.n_sink < 0:
            raise LtriError(f"n_sink must be 0 or more, got {self.n_sink}.")
        if self.n_window < 1:
            raise LtriError(f"n_window must be at least 1 token, got {self.n_window}.")


@dataclass(frozen=True)
class LtriConfig:
    """How a Session reads text.

    chunk_size: tokens per prefill step (bounds the work and memory of one forward).
    position_mode: ``compact`` lays the resident tokens out contiguously (a short-context model never
        sees a position past what it holds); ``true`` uses each token's position in the text.
    device: ``cpu``, ``cuda``, ``cuda:1``...; None picks CUDA when available.
    dtype: ``float32``, ``bfloat16`` or ``float16``; None means float32 on CPU and bfloat16 on CUDA.
    """

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    chunk_size: int = 512
    position_mode: str = "compact"
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise LtriError(f"chunk_size must be at least 1 token, got {self.chunk_size}.")
        if self.position_mode not in POSITION_MODES:
            raise LtriError(f"Unknown position mode {self.position_mode!r}: choose one of {', '.join(POSITION_MODES)}.")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise LtriError(f"Unknown dtype {self.dtype!r}: choose float32, bfloat16 or float16.")


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are decoded. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LtriError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LtriError(f"temperature must be 0 or more, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LtriError(f"top_p must be in (0, 1], got {self.top_p}.")
