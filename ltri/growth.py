"""Buffers that grow in place of being rebuilt: what a captured decode step reads must keep its address.

Growth is by at least a quarter, so that n appends cost O(n) copies and at most a fifth of a buffer is unused.
"""

from __future__ import annotations

import torch


def grown_capacity(capacity: int, needed: int, minimum: int = 0) -> int:
    """The capacity to grow to when needed entries do not fit in capacity."""
    return max(needed, capacity + capacity // 4, minimum)


def with_room(buffer: torch.Tensor, needed: int, device) -> torch.Tensor:
    """The 1-D buffer on device with room for needed entries: buffer itself when it is there and has
    them, else a new one holding its entries, then zeros."""
    if buffer.device != torch.device(device):
        buffer = buffer.to(device)
    if needed <= buffer.numel():
        return buffer
    grown = torch.zeros(grown_capacity(buffer.numel(), needed), dtype=buffer.dtype, device=buffer.device)
    grown[: buffer.numel()] = buffer
    return grown
