"""Timing helpers the benchmarks share: wait for the device before reading a clock, and the copy bandwidth
that bounds what a memory-bound step can reach (its floor: bytes moved / this)."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished what was queued (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 28) -> float:
    """Bytes/s of a large on-device copy (read + write counted), median of 5 after one warm-up."""
    source = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(times[1:])
