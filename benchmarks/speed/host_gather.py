"""How fast a decode step can gather its retrieved tokens straight from pinned host memory (zero copy).

A decode step of an 8B model (Llama-3 shape: 8 KV heads, head dim 128, bf16, 4 KB per token's keys and
values) retrieves up to `--budget` tokens per layer, in spans of about `--span` tokens. This times the
gather of those rows, for `--layers` layers, from `ltri.offload.host_payloads` (a CUDA tensor aliasing
pinned host rows, read over PCIe by index_select), eagerly and as one CUDA graph, against the same
gather from device memory and against the physical floor: the bytes over the measured pinned
host-to-device copy bandwidth.

    python3 benchmarks/speed/host_gather.py --out benchmarks/speed/results/host_gather_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch

from ltri.offload.host_payloads import HostPayloads


def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() by CUDA events, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def span_rows(n_tokens: int, budget: int, span: int, generator: torch.Generator) -> torch.Tensor:
    """(budget,) row numbers: budget // span runs of span consecutive rows at random places, ascending."""
    starts = torch.randperm(n_tokens // span, generator=generator)[: budget // span].sort().values * span
    return (starts[:, None] + torch.arange(span)[None, :]).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="stored tokens per layer")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--host-layers", type=int, default=4, help="distinct pinned layers (the rest reuse them)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--span", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    nheads_kv, headdim, dtype = 8, 128, torch.bfloat16

    layers = []
    for _ in range(args.host_layers):
        payloads = HostPayloads(nheads_kv, headdim, dtype, device)
        keys = torch.randn(nheads_kv, args.tokens, headdim, dtype=dtype, device=device)
        payloads.append(keys, keys * 2)
        layers.append(payloads)
    torch.cuda.synchronize()
    rows = [span_rows(args.tokens, args.budget, args.span, generator).to(device) for _ in range(args.layers)]
    views = [layers[i % args.host_layers].device_view() for i in range(args.layers)]
    on_device = [view[: args.tokens].clone() for view in views[: args.host_layers]]  # views span the reservation

    checked = all(
        torch.equal(views[i].index_select(0, rows[i]).cpu(), layers[i % args.host_layers].tokens[rows[i].cpu()])
        for i in range(args.layers)
    )

    def gather(sources):
        return [sources[i % len(sources)].index_select(0, rows[i]) for i in range(args.layers)]

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather(views)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        gathered = gather(views)
    graph.replay()
    torch.cuda.synchronize()
    checked = checked and all(
        torch.equal(gathered[i].cpu(), layers[i % args.host_layers].tokens[rows[i].cpu()]) for i in range(args.layers)
    )

    nbytes = args.layers * args.budget * 2 * nheads_kv * headdim * dtype.itemsize
    host_block = layers[0].tokens[: args.budget * args.layers]
    device_block = torch.empty(host_block.shape, dtype=dtype, device=device)
    results = {
        "host_gather_eager_ms": cuda_ms(lambda: gather(views), args.repeats),
        "host_gather_graph_ms": cuda_ms(graph.replay, args.repeats),
        "device_gather_eager_ms": cuda_ms(lambda: gather(on_device), args.repeats),
        "pinned_copy_ms": cuda_ms(lambda: device_block.copy_(host_block, non_blocking=True), args.repeats),
    }
    copy_gbps = nbytes / results["pinned_copy_ms"] / 1e6
    row = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "git_sha": os.environ.get("GIT_SHA") or _git_sha(),
        "command": "python3 benchmarks/speed/host_gather.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        **{key: value for key, value in vars(args).items() if key != "out"},
        "bytes": nbytes,
        "gathered_equal_host_rows": checked,
        **results,
        "pinned_copy_gbps": copy_gbps,
        "host_gather_graph_gbps": nbytes / results["host_gather_graph_ms"] / 1e6,
        "floor_ms": results["pinned_copy_ms"],
    }
    for key, value in row.items():
        print(f"{key:28s} {value}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1) + "\n")


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
