"""Write jobs run in order on one background thread, so that the caller does not wait for them.

The span store's writes (a GPU-to-host copy, crc32 and LMDB puts of every evicted span: about 2 MB per
layer and chunk of an 8B model) took 2.8 ms of host time per layer and chunk in the prefill profile
(benchmarks/speed/NOTES.md, step 3), in the thread that also launches the model's kernels. Here they
overlap with the next layers' work: crc32, memcpy and LMDB release the GIL.

Each job is tagged with the (layer, lowest span id, highest span id) it writes, so a reader waits only
for the jobs that hold spans it asks for. A job's error is raised in the caller's thread, by the next
submit, wait or drain.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

MAX_PENDING_JOBS = 64  # queued jobs (their host copies) before submit waits for the oldest


@dataclass(frozen=True)
class WriteJob:
    future: Future
    layer: int
    first_span: int
    last_span: int

    def holds_any(self, layer: int, span_ids: Iterable[int]) -> bool:
        return layer == self.layer and any(self.first_span <= span_id <= self.last_span for span_id in span_ids)


class BackgroundWriter:
    def __init__(self, max_pending: int = MAX_PENDING_JOBS) -> None:
        self.max_pending = max_pending
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[WriteJob] = deque()  # oldest first

    def submit(self, job: Callable[[], None], layer: int, span_ids: list[int]) -> None:
        """Queue job, which writes span_ids of layer; raises the error of any finished job first."""
        self._collect_finished()
        while len(self._jobs) >= self.max_pending:
            self._jobs.popleft().future.result()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltri-span-writer")
        future = self._executor.submit(job)
        self._jobs.append(WriteJob(future, layer, min(span_ids, default=0), max(span_ids, default=-1)))

    def wait_for(self, layer: int, span_ids: list[int]) -> None:
        """Return once every queued job holding one of span_ids of layer is done (jobs run in order: the newest
        such job and all before it)."""
        newest = next((n for n in range(len(self._jobs) - 1, -1, -1) if self._jobs[n].holds_any(layer, span_ids)), -1)
        for _ in range(newest + 1):
            self._jobs.popleft().future.result()
        self._collect_finished()

    def drain(self) -> None:
        """Return once every queued job is done."""
        while self._jobs:
            self._jobs.popleft().future.result()

    def close(self) -> None:
        """Drain, then stop the thread (also when a job failed: its error is raised after the thread stopped)."""
        try:
            self.drain()
        finally:
            self._jobs.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _collect_finished(self) -> None:
        while self._jobs and self._jobs[0].future.done():
            self._jobs.popleft().future.result()
