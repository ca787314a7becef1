"""The host's small tensor ops that ltri's bookkeeping runs, timed on this machine's CPU.

Two questions from benchmarks/speed/NOTES.md step 9:

1. Repeats by counts (a span's id or start once per token): torch's CPU repeat_interleave against numpy's repeat
   (``ltri.repeat.repeat_by_counts``), for span counts of a layer's eviction up to a layer's whole table.
2. An elementwise op over a layer's span table as it grows (an in-place int64 add): below torch's grain size
   (32,768 entries) it runs on the calling thread, above it on every intra-op thread. Reported: microseconds per
   call and the process's CPU time over wall time (above 1: other threads worked), with torch's default threads
   and with one (``ltri.host_threads``).

    python3 benchmarks/speed/host_ops.py --out benchmarks/speed/results/host_ops_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from ltri.provenance import git_sha
from ltri.repeat import repeat_by_counts


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, calls: int, rounds: int) -> dict:
    """Median over rounds of microseconds per call, and that round's process CPU time over wall time."""
    fn()
    results = []
    for _ in range(rounds):
        cpu, wall = process_cpu_s(), time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - wall
        results.append((1e6 * wall / calls, (process_cpu_s() - cpu) / wall))
    us, cpu_per_wall = sorted(results)[len(results) // 2]
    return {"us_per_call": us, "cpu_per_wall": cpu_per_wall}


def repeat_rows(span_counts: list[int], calls: int, rounds: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n_spans in span_counts:
        counts = torch.randint(1, 28, (n_spans,), generator=generator)  # about 14 tokens a span, as at 512K
        starts = torch.randint(0, 1 << 20, (n_spans,), generator=generator)
        assert torch.equal(repeat_by_counts(starts, counts), torch.repeat_interleave(starts, counts))
        for method, fn in (
            ("torch.repeat_interleave", lambda s=starts, c=counts: torch.repeat_interleave(s, c)),
            ("numpy.repeat (repeat_by_counts)", lambda s=starts, c=counts: repeat_by_counts(s, c)),
        ):
            rows.append({"op": "repeat by counts", "n": n_spans, "method": method, **timed(fn, calls, rounds)})
    return rows


def add_rows(sizes: list[int], calls: int, rounds: int) -> list[dict]:
    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for n in sizes:
            x, y = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
            timing = timed(lambda x=x, y=y: x.add_(y), calls, rounds)
            rows.append({"op": "int64 add_", "n": n, "threads": threads, **timing})
    torch.set_num_threads(default_threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = repeat_rows([150, 2400, 35000], args.calls, args.rounds)
    rows += add_rows([9000, 30000, 35000, 70000], args.calls, args.rounds)
    for row in rows:
        what = row.get("method") or f"{row['threads']} thread(s)"
        speed = f"{row['us_per_call']:9.1f} us  cpu/wall {row['cpu_per_wall']:.2f}"
        print(f"{row['op']:18s} n={row['n']:>6}  {what:32s} {speed}")
    result = {
        "env": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "git_sha": git_sha(),
            "command": f"python3 benchmarks/speed/host_ops.py --calls {args.calls} --rounds {args.rounds} --out ...",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
