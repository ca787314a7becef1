"""What a grid-wide barrier costs inside one launch, against what a kernel boundary costs (issue 4, NOTES.md step 36).

The fused decode step of one layer is six dependent stages, each its own launch (NOTES.md steps 27-35); one way to
a shorter step is one persistent launch whose programs (one per SM, all resident) wait for each other between the
stages instead of ending. Whether that can pay depends on two numbers this measures on the GPU, per call inside a
CUDA graph (no host launch overhead), each call preceded by the counter's reset (one memset, in every row):

    barriers[R]     one launch of one program per SM that passes R grid barriers (each program writes a value,
                    arrives on a global counter, spins until every program has arrived, then reads a neighbour's
                    value: the barrier is checked, and out says whether every read saw its round's value)
    launches[R]     R + 1 launches of a one-program-per-SM kernel that writes and reads the same values, back to back

so the cost of a barrier is the slope of barriers[R] in R and that of a kernel boundary the slope of launches[R].
A spin is bounded (`--max-spins`): a barrier that never completes (programs not all resident) ends the kernel with
out marked failed instead of hanging the GPU. Triton's interpreter runs programs one after another, so the barrier
kernel runs on a GPU only.

    python3 benchmarks/speed/grid_sync.py --out benchmarks/speed/results/grid_sync_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import torch
from host_gather import cuda_ms  # this script's folder: run it as a script
from host_selection import as_graph

tl = None  # triton.language, bound by _kernels() on first use

ROUNDS = (0, 1, 4, 16, 64)


def _barrier_kernel(counter_ptr, values_ptr, out_ptr, n_rounds, max_spins, N_PROGRAMS: tl.constexpr):
    """R rounds of: write pid + r to this round's half of values, arrive, spin until all N_PROGRAMS arrived, read
    the next program's value. out[pid] = the sum of what it read, or -1 if a spin gave up."""
    pid = tl.program_id(0)
    total = tl.zeros([], dtype=tl.int64)
    failed = tl.zeros([], dtype=tl.int32)
    for r in range(n_rounds):
        half = values_ptr + (r % 2) * N_PROGRAMS  # two halves: a fast program's next write misses a slow one's read
        tl.store(half + pid, pid + r)
        tl.debug_barrier()  # the program's write is made before it arrives
        tl.atomic_add(counter_ptr, 1, sem="release")
        target = (r + 1) * N_PROGRAMS
        spins = tl.zeros([], dtype=tl.int32)
        while (tl.atomic_add(counter_ptr, 0, sem="acquire") < target) & (spins < max_spins):
            spins += 1
        failed = tl.where(spins >= max_spins, 1, failed)
        total += tl.load(half + (pid + 1) % N_PROGRAMS, cache_modifier=".cg").to(tl.int64)
    tl.store(out_ptr + pid, tl.where(failed > 0, -1, total))


def _step_kernel(values_ptr, out_ptr, r, N_PROGRAMS: tl.constexpr):
    """One round as its own launch: read the next program's value of the round before, write this round's; after
    launches 0..R, out is what the barrier kernel's R rounds give (expected_sums)."""
    pid = tl.program_id(0)
    seen = tl.load(values_ptr + ((r + 1) % 2) * N_PROGRAMS + (pid + 1) % N_PROGRAMS).to(tl.int64)
    tl.store(values_ptr + (r % 2) * N_PROGRAMS + pid, pid + r)
    tl.store(out_ptr + pid, tl.load(out_ptr + pid) + tl.where(r > 0, seen, 0))


@functools.cache
def _kernels():
    """JIT wrappers of the two kernels above; the only place triton is imported."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_barrier_kernel), triton.jit(_step_kernel)


def with_barriers(barrier, counter, values, out, rounds: int, max_spins: int) -> None:
    """The counter's reset, then one launch of one program per value that passes `rounds` grid barriers."""
    counter.zero_()
    barrier[(out.numel(),)](counter, values, out, rounds, max_spins, N_PROGRAMS=out.numel(), num_warps=4)


def with_launches(step, counter, values, out, rounds: int) -> None:
    """The same reset (and out's), then rounds + 1 launches of the one-round kernel, back to back."""
    counter.zero_()
    out.zero_()
    for r in range(rounds + 1):
        step[(out.numel(),)](values, out, r, N_PROGRAMS=out.numel(), num_warps=4)


def expected_sums(n_programs: int, n_rounds: int) -> torch.Tensor:
    """out of the barrier kernel when every barrier held: program p read (p + 1) % n + r in each round r."""
    neighbour = (torch.arange(n_programs) + 1) % n_programs
    return neighbour * n_rounds + n_rounds * (n_rounds - 1) // 2


def slope(rows: list[dict], method: str) -> float:
    """Least-squares ms per round of one method's rows."""
    points = [(r["rounds"], r["ms"]) for r in rows if r["method"] == method]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--max-spins", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("grid_sync.py needs a CUDA GPU: Triton's interpreter runs programs one after another.")
    barrier, step = _kernels()
    n = torch.cuda.get_device_properties(0).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    values = torch.zeros(2 * n, dtype=torch.int32, device="cuda")
    out = torch.zeros(n, dtype=torch.int64, device="cuda")
    rows = []
    for rounds in ROUNDS:
        calls = (
            ("barriers", functools.partial(with_barriers, barrier, counter, values, out, rounds, args.max_spins)),
            ("launches", functools.partial(with_launches, step, counter, values, out, rounds)),
        )
        for method, fn in calls:
            ms = cuda_ms(as_graph(fn, counter.device), args.reps)  # replayed from a CUDA graph
            row = {"method": method, "rounds": rounds, "ms": ms}
            if method == "barriers":
                row["barriers_held"] = bool(torch.equal(out.cpu(), expected_sums(n, rounds)))
            rows.append(row)
            print(f"{method:>9} rounds {rounds:>3}: {ms:.4f} ms" + (f"  held {row['barriers_held']}"
                                                                      if "barriers_held" in row else ""))  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(0),
        "programs": n,
        "git_sha": os.environ.get("GIT_SHA"),
        "rows": rows,
        "ms_per_barrier": slope(rows, "barriers"),
        "ms_per_launch": slope(rows, "launches"),
    }
    print(f"per grid barrier {result['ms_per_barrier'] * 1000:.2f} us, per kernel boundary "
          f"{result['ms_per_launch'] * 1000:.2f} us ({n} programs, in a CUDA graph)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
