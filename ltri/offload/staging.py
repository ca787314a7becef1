"""Reusable host staging buffers for host-to-GPU copies: pinned when CUDA is available, grown on demand.

A buffer handed out by acquire() may still be the source of a copy the GPU has not finished; the
caller records an event after enqueuing its copies (release), and the next acquire of that buffer
waits for the event before the host writes into it again. Buffers are used round robin, so with two
of them the host can fill one while the GPU still reads the other.
"""

from __future__ import annotations

import torch


def _round_up_pow2(nbytes: int) -> int:
    return 1 << max(nbytes - 1, 0).bit_length()


class StagingBuffer:
    """One growable uint8 host buffer and the event of the last copy that read it."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.data = torch.empty(0, dtype=torch.uint8)  # (capacity,)
        self.event: torch.cuda.Event | None = None

    def reserve(self, nbytes: int) -> torch.Tensor:
        """The first nbytes of the buffer, after any copy still reading it is done."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if nbytes > self.data.numel():
            self.data = torch.empty(_round_up_pow2(nbytes), dtype=torch.uint8, pin_memory=self.pin)
        return self.data[:nbytes]


class StagingPool:
    """n_buffers staging buffers handed out round robin; each grows to the largest request it served."""

    def __init__(self, n_buffers: int = 2, pin: bool | None = None) -> None:
        if n_buffers < 1:
            raise ValueError("a staging pool needs at least one buffer")
        pin = torch.cuda.is_available() if pin is None else pin
        self.buffers = [StagingBuffer(pin) for _ in range(n_buffers)]
        self._next = 0

    def acquire(self, nbytes: int) -> tuple[StagingBuffer, torch.Tensor]:
        """A buffer and a uint8 view of nbytes of it, free to write now."""
        buffer = self.buffers[self._next]
        self._next = (self._next + 1) % len(self.buffers)
        return buffer, buffer.reserve(nbytes)

    @staticmethod
    def release(buffer: StagingBuffer, stream: torch.cuda.Stream) -> None:
        """Mark that the copies enqueued on stream so far read buffer: its next use waits for them."""
        buffer.event = torch.cuda.Event()
        buffer.event.record(stream)

    def nbytes(self) -> int:
        return sum(buffer.data.numel() for buffer in self.buffers)
