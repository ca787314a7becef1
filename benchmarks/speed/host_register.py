"""What registering host rows with CUDA costs, and what it costs the work beside it (NOTES.md step 17).

    python3 benchmarks/speed/host_register.py --out $OUT/host_register_h100.json      # on the GPU machine

In a 128K prefill on the H100 the 16K-token slices in which every layer's next 256 MB piece of host rows registers
(cudaHostRegister, on a background thread) ran at half the speed of the others. This script measures, on pieces
mapped and registered as ``ltri.offload.host_payloads.HostPayloads`` does (``reserved_region``, ``CudaRegistration``):

- ``register``: milliseconds a cudaHostRegister of one piece takes on fresh pages, and on pages faulted in first
  by ``host_payloads.prefault_pages`` (its own milliseconds beside);
- ``beside``: a prefill-like loop on the main thread (bf16 matmuls, a device-to-host copy into registered memory,
  a synchronize) timed per iteration while a background thread registers ``--pieces`` pieces one after another,
  fresh or prefaulted, against the same loop with nothing in the background.

Prints one table and writes the rows as JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from ltri.offload.host_payloads import CudaRegistration, prefault_pages, reserved_region
from ltri.provenance import git_sha

CUDA = CudaRegistration(None)  # the rows' own registration calls, on the current device


class Pieces:
    """count pieces of piece_bytes in one private anonymous mapping with 2 MB pages advised."""

    def __init__(self, count: int, piece_bytes: int) -> None:
        self.count, self.piece_bytes = count, piece_bytes
        self.region = reserved_region(count * piece_bytes)
        self.bytes = torch.frombuffer(self.region, dtype=torch.uint8)
        self.address = self.bytes.data_ptr()
        self.registered = 0  # the first pieces, registered in order

    def piece(self, i: int) -> int:
        return self.address + i * self.piece_bytes

    def release(self) -> None:
        """Unregister every piece and give the pages back."""
        for i in range(self.registered):
            CUDA.unregister(self.piece(i))
        self.registered = 0
        self.region.madvise(mmap.MADV_DONTNEED)


def register(address: int, size: int) -> float:
    """Milliseconds of one cudaHostRegister (mapped, as the host rows are)."""
    started = time.perf_counter()
    error = CUDA.register(address, size)
    if error != 0:
        raise SystemExit(f"cudaHostRegister failed with CUDA error {error}")
    return (time.perf_counter() - started) * 1e3


def register_pieces(pieces: Pieces, prefault: bool, timings: list[dict]) -> None:
    for i in range(pieces.count):
        prefault_ms = None
        if prefault:
            started = time.perf_counter()
            prefault_pages(pieces.piece(i), pieces.piece_bytes)
            prefault_ms = (time.perf_counter() - started) * 1e3
        timings.append({"prefault_ms": prefault_ms, "register_ms": register(pieces.piece(i), pieces.piece_bytes)})
        pieces.registered += 1


class Loop:
    """A prefill-like step: four (4096 x 4096) bf16 matmuls, an 8 MB device-to-host copy into registered memory,
    a synchronize (the prefill's per-layer waits)."""

    def __init__(self) -> None:
        self.x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
        self.w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        self.source = torch.empty(8 * 2**20, dtype=torch.uint8, device="cuda")
        self.target = torch.empty(8 * 2**20, dtype=torch.uint8, pin_memory=True)

    def step(self) -> float:
        started = time.perf_counter()
        y = self.x
        for _ in range(4):
            y = (y @ self.w).clamp_(-1, 1)
        self.target.copy_(self.source, non_blocking=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1e3

    def run_beside(self, background, min_steps: int) -> tuple[list[float], float]:
        """Steps while background() runs in a thread (at least min_steps); returns step times and its seconds."""
        done, times = threading.Event(), []
        seconds = [0.0]

        def target() -> None:
            started = time.perf_counter()
            background()
            seconds[0] = time.perf_counter() - started
            done.set()

        thread = threading.Thread(target=target)
        thread.start()
        while not done.is_set() or len(times) < min_steps:
            times.append(self.step())
        thread.join()
        return times, seconds[0]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "n": len(values)}


def background_work(background: str, pieces: Pieces, timings: list[dict]):
    """What the background thread does: nothing for a second ("none"), or register every piece."""
    if background == "none":
        return lambda: time.sleep(1.0)
    return lambda: register_pieces(pieces, background == "prefaulted", timings)


def measure(pieces_count: int, piece_mb: int, min_steps: int) -> list[dict]:
    piece_bytes = piece_mb * 2**20
    rows = []
    for prefault in (False, True):
        pieces, timings = Pieces(pieces_count, piece_bytes), []
        register_pieces(pieces, prefault, timings)
        pieces.release()
        rows.append(
            {
                "case": "register",
                "pages": "prefaulted" if prefault else "fresh",
                "piece_mb": piece_mb,
                "register_ms": summary([t["register_ms"] for t in timings]),
                "prefault_ms": summary([t["prefault_ms"] for t in timings]) if prefault else None,
            }
        )
    loop = Loop()
    for _ in range(20):
        loop.step()
    for background in ("none", "fresh", "prefaulted"):
        pieces, timings = Pieces(pieces_count, piece_bytes), []
        times, seconds = loop.run_beside(background_work(background, pieces, timings), min_steps)
        pieces.release()
        rows.append(
            {
                "case": "beside",
                "background": background,
                "pieces": 0 if background == "none" else pieces_count,
                "piece_mb": piece_mb,
                "background_s": seconds,
                "step_ms": summary(times),
                "register_ms": summary([t["register_ms"] for t in timings]) if timings else None,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':8} {'pages / background':20} {'register ms':>12} {'prefault ms':>12} {'step ms':>16} {'bg s':>6}")
    for row in rows:
        kind = row.get("pages") or row.get("background")
        register_ms = row.get("register_ms")
        prefault_ms = row.get("prefault_ms")
        step = row.get("step_ms")
        print(
            f"{row['case']:8} {kind:20} {register_ms['median'] if register_ms else float('nan'):12.1f} "
            f"{prefault_ms['median'] if prefault_ms else float('nan'):12.1f} "
            f"{(step['median'] if step else float('nan')):7.2f}/{(step['mean'] if step else float('nan')):7.2f}  "
            f"{row.get('background_s', float('nan')):6.2f}"
        )
    print("step ms: median/mean of the main thread's loop; register ms: median of one piece's cudaHostRegister")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=32, help="pieces registered one after another (32 layers)")
    parser.add_argument("--piece-mb", type=int, default=256)
    parser.add_argument("--min-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_register.py measures CUDA registrations: run it where a CUDA GPU is.")
    rows = measure(args.pieces, args.piece_mb, args.min_steps)
    print_table(rows)
    if args.out is not None:
        document = {
            "benchmark": "host_register",
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "git_sha": git_sha(),
            "command": "python3 " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
