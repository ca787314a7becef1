"""Span segmentation of one prefill chunk: ``segment`` on each layer's block against ``segment_many`` on all.

    python3 benchmarks/speed/segmentation.py                      # CUDA when present, else the CPU
    python3 benchmarks/speed/segmentation.py --device cpu --blocks 8 --n 256 --repeats 3

Blocks: --blocks planted causal attention blocks of --n tokens (the head-averaged chunk attention of as many
layers), each different: triangles of 8..128 tokens holding 60% of each row's mass, a background decaying
with distance (25%), a sink at token 0 (15%), log-normal noise. One JSON line per method:
- segment_loop: ``ltri.spans.segment`` on each block in turn;
- segment_many: ``ltri.span_batch.segment_many`` as it runs by default (batched off the CPU, one block after
  the other on the CPU);
- segment_many_batched: segment_many forced to one batched pass (what it does on a GPU);
- first_owner_dense, first_owner: the host's part of claiming tokens (each token's best kept span) on the kept
  spans of the batched pass, by the dense cover of every span and token, and as ``claim_tokens`` does it now
  (running sums, for disjoint spans).
ms_per_chunk: median over --repeats calls after one warm-up, the device synchronised before and after each;
same_as_loop: whether the method cut every block exactly as segment_loop did (for the first_owner rows: whether
both give the same owners). --methods picks some.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from ltri.span_batch import segment_many
from ltri.spans import Segmentation, _first_owner, _owner_by_cover, candidate_grid, greedy_nms, segment, triangle_scores
from ltri.timing import synchronize


def planted_blocks(n_blocks: int, n: int, seed: int) -> torch.Tensor:
    """(n_blocks, n, n) float32 causal attention, rows summing to 1, different triangles in each block."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]

    def rows_to_one(x: torch.Tensor) -> torch.Tensor:
        x = x.double() * (cols <= rows)
        return x / x.sum(-1, keepdim=True).clamp(min=1e-30)

    background = rows_to_one(1.0 / (rows - cols + 1).clamp(min=1))
    sink = rows_to_one((cols == 0).expand(n, n))
    blocks = []
    for _ in range(n_blocks):
        lengths = torch.randint(8, 129, (n // 8 + 1,), generator=generator)  # more tokens than n
        triangle = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[:n]  # (n,) triangle of each token
        local = rows_to_one(triangle[:, None] == triangle[None, :])
        noise = torch.exp(0.3 * torch.randn(n, n, generator=generator, dtype=torch.float64))
        blocks.append(rows_to_one((0.6 * local + 0.25 * background + 0.15 * sink) * noise))
    return torch.stack(blocks).float()


def median_ms(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall-clock ms of run() over repeats calls, after one warm-up, the device synchronised."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def same_cuts(got: list[Segmentation], want: list[Segmentation]) -> bool:
    fields = ("starts", "ends", "scores", "from_triangles")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in zip(got, want, strict=True) for f in fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=32, help="blocks per chunk (the model's layers)")
    parser.add_argument("--n", type=int, default=512, help="tokens per block (the chunk size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="segment_loop,segment_many,segment_many_batched,first_owner")
    args = parser.parse_args()
    device = torch.device(args.device)
    attention = planted_blocks(args.blocks, args.n, args.seed).to(device)
    methods = {
        "segment_loop": lambda: [segment(block) for block in attention],
        "segment_many": lambda: segment_many(attention),
        "segment_many_batched": lambda: segment_many(attention, batched=True),
    }
    wanted = args.methods.split(",")
    if any(method.startswith("segment") for method in wanted):
        reference = methods["segment_loop"]()
    for method, run in methods.items():
        if method not in wanted:
            continue
        row = {
            "method": method,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "blocks": args.blocks,
            "n": args.n,
            "ms_per_chunk": round(median_ms(run, device, args.repeats), 2),
            "same_as_loop": same_cuts(run(), reference),
        }
        print(json.dumps(row), flush=True)
    if "first_owner" in wanted:
        owner_rows(attention, args)


def owner_rows(attention: torch.Tensor, args: argparse.Namespace) -> None:
    """The kept spans' owners of every token, dense against running sums, on the host as in claim_tokens."""
    scores = triangle_scores(attention, None, 128)
    picks = greedy_nms(candidate_grid(scores, args.n, 8, 128), 0.0).cpu()  # segment's defaults
    dense = _owner_by_cover(picks, args.n)
    for method, run in (("first_owner_dense", _owner_by_cover), ("first_owner", _first_owner)):
        row = {"method": method, "device": "cpu", "blocks": args.blocks, "n": args.n, "kept_per_block": picks.shape[1]}
        row["ms_per_chunk"] = round(median_ms(lambda run=run: run(picks, args.n), torch.device("cpu"), args.repeats), 2)
        row["same_as_loop"] = torch.equal(run(picks, args.n), dense)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
