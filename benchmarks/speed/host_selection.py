"""What the captured decode step's token selection reads over PCIe, and how long it takes (NOTES.md step 29).

A captured step with a selector scores every retrieved token of a layer before it keeps each KV head's best
(`ltri/captured_decode.py`, `CapturedLayer.select`). The retrieved tokens' keys live in pinned host rows
(`ltri.offload.host_payloads`, read by the GPU over PCIe); Loki's projections of them may live beside them
(`ltri.offload.projected_keys`). This times, for `--layers` layers of an 8B model's shape (8 KV heads, head dim
128, 32 query heads, bf16) and `--budget` retrieved tokens in spans of `--span`, one layer's selection (scores,
then top-k of `--select-tokens`) as one CUDA graph over all layers, each way it can read:

    sparq_gathered   the keys gathered (one index kernel), then SparQ's scores: the product's SparQ step
    sparq_in_place   SparQ's scores reading the keys' chosen components in place through the rows
    loki_gathered    the keys gathered, projected, then Loki's scores: the product's Loki step before step 29
    loki_projected   Loki's scores reading the stored projections in place through the rows: the step now

each against its floor, the bytes it must read over the pinned host-to-device copy bandwidth measured in the
run (whole keys for the first three, projections for the last), and the share of chosen tokens each pair of ways
agrees on (`agreement`).

    python3 benchmarks/speed/host_selection.py --out benchmarks/speed/results/host_selection_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from host_gather import cuda_ms, span_rows  # this script's folder: run it as a script
from ltri.kernels.lowrank_scores import pca_basis

from ltri.offload.host_payloads import HostPayloads
from ltri.offload.projected_keys import ProjectedKeys
from ltri.token_selection import TokenSelector

NHEADS, NHEADS_KV, HEADDIM = 32, 8, 128


class Layer:
    """One layer's stored tokens in host rows, Loki's projections beside them, a query and retrieved rows."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> None:
        keys = torch.randn(NHEADS_KV, args.tokens, HEADDIM, generator=generator).to(device, dtype)
        self.payloads = HostPayloads(NHEADS_KV, HEADDIM, dtype, device, max_tokens=args.tokens)
        self.payloads.append(keys, keys)
        basis = pca_basis(keys[:, :4096].float()).to(device)
        self.projections = ProjectedKeys(basis, args.rank, dtype, max_tokens=args.tokens)
        self.projections.catch_up(self.payloads, keys)
        self.query = torch.randn(1, NHEADS, 1, HEADDIM, generator=generator).to(device, dtype)
        self.rows = span_rows(args.tokens, args.budget, args.span, generator).to(device)
        self.n_valid = torch.full((NHEADS_KV,), args.budget, dtype=torch.long, device=device)
        self.sparq = TokenSelector("sparq", args.select_tokens, args.rank)
        self.loki = TokenSelector("loki", args.select_tokens, args.rank, basis)

    def keys_view(self) -> torch.Tensor:
        return self.payloads.device_view()[:, 0].transpose(0, 1)  # (nheads_kv, max_tokens, headdim)

    def gathered(self) -> torch.Tensor:
        return self.payloads.device_view()[self.rows, 0].transpose(0, 1)  # (nheads_kv, budget, headdim)

    def select(self, way: str) -> torch.Tensor:
        """Each KV head's chosen indices (nheads_kv, select_tokens) into the retrieved rows, read the way named."""
        ways = {
            "sparq_gathered": lambda: self.sparq.best(self.query, self.gathered(), self.n_valid),
            "sparq_in_place": lambda: self.sparq.best(self.query, self.keys_view(), self.n_valid, self.rows),
            "loki_gathered": lambda: self.loki.best(self.query, self.loki.scored_keys(self.gathered()), self.n_valid),
            "loki_projected": lambda: self.loki.best(self.query, self.projections.scored(), self.n_valid, self.rows),
        }
        return ways[way]()


WAYS = ("sparq_gathered", "sparq_in_place", "loki_gathered", "loki_projected")


def timed_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() by CUDA events on a GPU (host_gather.py's timer); elsewhere the mean wall time
    (the CPU run only checks the script)."""
    if device.type == "cuda":
        return cuda_ms(fn, repeats)
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def as_graph(fn, device: torch.device):
    """fn captured as one CUDA graph's replay on a GPU; fn itself elsewhere."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    layers = [Layer(args, device, dtype, generator) for _ in range(args.host_layers)]
    per_layer = [layers[i % len(layers)] for i in range(args.layers)]
    chosen = {way: [layer.select(way) for layer in layers] for way in WAYS}
    agreement = {  # the share of chosen indices both ways choose (bf16 rounding may part near ties on a GPU)
        method: _shared_share(chosen[f"{method}_gathered"], chosen[f"{method}_{other}"])
        for method, other in (("sparq", "in_place"), ("loki", "projected"))
    }
    key_bytes = args.layers * args.budget * NHEADS_KV * HEADDIM * dtype.itemsize
    projected_bytes = args.layers * args.budget * NHEADS_KV * args.rank * dtype.itemsize
    row_bytes = 2 * NHEADS_KV * HEADDIM * dtype.itemsize  # a token's host row: its keys and values
    block = layers[0].payloads.tokens[: key_bytes // row_bytes]  # whole rows holding key_bytes in all
    device_block = torch.empty(block.shape, dtype=dtype, device=device)
    copy_ms = timed_ms(lambda: device_block.copy_(block, non_blocking=True), args.repeats, device)
    copy_gbps = block.numel() * block.element_size() / copy_ms / 1e6
    rows = []
    for way in WAYS:
        step = as_graph(lambda way=way: [layer.select(way) for layer in per_layer], device)
        ms = timed_ms(step, args.repeats, device)
        nbytes = projected_bytes if way == "loki_projected" else key_bytes
        rows.append(
            {"way": way, "ms": ms, "bytes": nbytes, "gbps": nbytes / ms / 1e6, "floor_ms": nbytes / copy_gbps / 1e6}
        )
    return {"agreement": agreement, "pinned_copy_gbps": copy_gbps, "rows": rows}


def _shared_share(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """The share of the chosen indices (nheads_kv, k) of each layer that both choices hold, per KV head."""
    shared = total = 0
    for a, b in zip(first, second, strict=True):
        for head_a, head_b in zip(a.tolist(), b.tolist(), strict=True):
            shared += len(set(head_a) & set(head_b))
            total += len(head_a)
    return shared / total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="stored tokens per layer")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--host-layers", type=int, default=4, help="distinct layers (the rest reuse them)")
    parser.add_argument("--budget", type=int, default=4096, help="retrieved tokens per layer")
    parser.add_argument("--span", type=int, default=16)
    parser.add_argument("--select-tokens", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16, help="select_rank: Loki's components, SparQ's r")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = {
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "git_sha": os.environ.get("GIT_SHA"),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        **measure(args),
    }
    print(f"{'way':16s} {'ms':>8s} {'MB':>8s} {'GB/s':>8s} {'floor ms':>9s}")
    for row in result["rows"]:
        print(f"{row['way']:16s} {row['ms']:8.3f} {row['bytes'] / 1e6:8.2f} {row['gbps']:8.1f} {row['floor_ms']:9.3f}")
    print(f"chosen alike: {result['agreement']}; pinned copy {result['pinned_copy_gbps']:.1f} GB/s (the floor's)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
