"""Each value repeated by its count, as torch.repeat_interleave(values, counts), without its costs on the host.

On the CPU, torch's repeat_interleave hands its work to the intra-op threads: the H100 machine's prefill profile
charged it 0.45 ms a call, 22% of the host's time, and on 2 idle cores it took 1.4 to 3.6 times numpy's one-thread
repeat (benchmarks/speed/NOTES.md step 9, results/host_ops_cpu.json). On a device it waits for the device to learn
the output's length unless it is told (output_size).
"""

from __future__ import annotations

import numpy as np
import torch


def repeat_by_counts(values: torch.Tensor | None, counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """values (n,) (None: 0..n-1) and counts (n,) int64 >= 0 on one device -> (counts.sum(),): values[i] counts[i]
    times, in order. total: counts.sum() where the caller knows it, so that a device's call need not wait."""
    if values is None:
        values = torch.arange(counts.numel(), device=counts.device)
    if counts.device.type == "cpu":
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts, output_size=total)


def concatenated_ranges(starts: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
    """starts, counts (n,) int64 on the CPU, counts summing to total -> (total,): the ranges
    [starts[i], starts[i] + counts[i]) one after another."""
    firsts = torch.cumsum(counts, 0) - counts  # where each range begins in the output
    return repeat_by_counts(starts - firsts, counts, total) + torch.arange(total)
