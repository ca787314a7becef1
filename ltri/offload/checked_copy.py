"""Read payloads checked (crc32) and copied into their destinations, over a few threads when there is much to do.

A decode step that misses the span cache reads its spans' payloads from LMDB: each is crc32-checked and copied
into pinned staging memory, about 2 MB a layer for an 8B model at a 512-token budget, which is several ms a step
on one thread. Both release the GIL (zlib above a few KB, numpy's byte copies), so a few threads do them side by
side. Below PARALLEL_BYTES, handing the work out costs more than it saves and one thread does it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

PARALLEL_BYTES = 1 << 19
MAX_WORKERS = 4


@dataclass(frozen=True)
class CopyJob:
    payload: memoryview  # the stored bytes
    crc: int  # their stored crc32
    destination: np.ndarray  # (len(payload),) uint8, where they go


class CheckedCopier:
    def __init__(self, workers: int | None = None, parallel_bytes: int = PARALLEL_BYTES) -> None:
        self.workers = min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else workers
        self.parallel_bytes = parallel_bytes
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: Sequence[CopyJob]) -> int | None:
        """Checks and copies every job. Returns None when all are sound, else the index of the first whose crc32
        fails (the caller must raise: payloads after a failing one may be copied or not)."""
        total = sum(len(job.payload) for job in jobs)
        if self.workers < 2 or len(jobs) < 2 or total < self.parallel_bytes:
            return check_and_copy(jobs, range(len(jobs)))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ltri-read")
        groups = groups_by_bytes([len(job.payload) for job in jobs], self.workers)
        failures = [bad for bad in self._pool.map(lambda group: check_and_copy(jobs, group), groups) if bad is not None]
        return min(failures) if failures else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def check_and_copy(jobs: Sequence[CopyJob], indices: range) -> int | None:
    """Jobs indices in order; the index of the first failing crc32 (then stops), or None."""
    for index in indices:
        job = jobs[index]
        if zlib.crc32(job.payload) != job.crc:
            return index
        np.copyto(job.destination, np.frombuffer(job.payload, dtype=np.uint8))
    return None


def groups_by_bytes(sizes: Sequence[int], n_groups: int) -> list[range]:
    """Consecutive index ranges covering sizes, each about sum(sizes) / n_groups bytes (none empty)."""
    total = sum(sizes)
    groups, start, done = [], 0, 0
    for index, size in enumerate(sizes):
        done += size
        if done * n_groups >= total * (len(groups) + 1) and index + 1 > start:
            groups.append(range(start, index + 1))
            start = index + 1
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups
