"""One intra-op thread for the host's own work while a forward runs on CUDA.

On CUDA the host's part of a forward is bookkeeping over small tensors: span ids, lengths, slot tables, a few
entries per span of a layer. Past torch's grain size (32,768 entries; a layer's span tables pass it near 512K
tokens, about 35K spans) torch spreads such an op over every intra-op thread, which then spin waiting for the
next. While decoding at 512K tokens on the H100 machine's 32 cores the process used a median of 27 cores' worth
of CPU time per step (up to 3.9 s in a 128 ms step), where at 128K it used two threads' worth, and its steps
stalled irregularly
(benchmarks/speed/NOTES.md step 9; that this is the cause is not measured yet). On a CPU the forward's own
compute wants the threads: nothing changes there.

torch's thread count is the process's: another thread's CPU work in the same process runs on one thread too
while a CUDA forward is under way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_host_thread(device: torch.device | str) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside, when device is CUDA; restored on leaving."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
