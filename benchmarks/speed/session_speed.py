"""Session prefill and decode speed of the memory policies, against full attention in the same run.

    python benchmarks/speed/session_speed.py --lengths 2k,8k --policies full,streaming \
        --out benchmarks/speed/results/session_speed_cpu.json

For each policy and context length: prefill tokens/s (chunked, through ltri's attention), decode
ms/token (one token at a time after the prefill), resident tokens and KV bytes. The physical floor of
a decode step is the bytes it must read (weights + resident KV) divided by the copy bandwidth
measured in the same run. Model: the bundled SmolLM2 unless --model is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ltri import LtriConfig, MemoryConfig, Session, load_model
from ltri.filler import filler_text


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 28) -> float:
    """Bytes/s of a large copy (read + write counted), median of 5."""
    source = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * source.nbytes / statistics.median(times[1:])


def context_ids(tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    seed = 0
    while len(ids) < n_tokens:
        ids += tokenizer(filler_text(400, seed=seed), add_special_tokens=False)["input_ids"]
        seed += 1
    return ids[:n_tokens]


def measure(model, tokenizer, policy: str, n_tokens: int, args) -> dict:
    memory = MemoryConfig(policy=policy, n_sink=args.sink, n_window=args.window)
    session = Session(model, LtriConfig(memory=memory, chunk_size=args.chunk), tokenizer=tokenizer)
    device = session.device
    ids = context_ids(tokenizer, n_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    session.prefill(ids)
    synchronize(device)
    prefill_seconds = time.perf_counter() - start
    step_times = []
    for token in ids[: args.decode_tokens]:
        synchronize(device)
        start = time.perf_counter()
        session.prefill([token])
        synchronize(device)
        step_times.append(time.perf_counter() - start)
    stats = session.stats()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = 1000 * (weight_bytes + stats.memory_bytes) / args.bandwidth
    return {
        "policy": policy,
        "context_len": n_tokens,
        "prefill_tok_s": n_tokens / prefill_seconds,
        "decode_ms": 1000 * statistics.median(step_times),
        "decode_floor_ms": floor_ms,
        "resident_tokens": stats.resident_tokens,
        "kv_bytes": stats.memory_bytes,
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def environment(device: torch.device) -> dict:
    import transformers

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_sha": sha,
        "command": " ".join(sys.argv),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2k,8k")
    parser.add_argument("--policies", default="full,streaming")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    args.bandwidth = copy_bandwidth(device)
    for policy in args.policies.split(","):  # warm-up: first kernels, allocator, lazy imports
        measure(model, tokenizer, policy, min(1024, parse_length(args.lengths.split(",")[0])), args)
    rows = []
    for n_tokens in [parse_length(x) for x in args.lengths.split(",")]:
        for policy in args.policies.split(","):
            rows.append(measure(model, tokenizer, policy, n_tokens, args))
            row = rows[-1]
            print(
                f"{row['policy']:>10} {row['context_len']:>7} tokens  prefill {row['prefill_tok_s']:8.0f} tok/s  "
                f"decode {row['decode_ms']:7.2f} ms (floor {row['decode_floor_ms']:.2f})  "
                f"resident {row['resident_tokens']:>7}  kv {row['kv_bytes'] / 1e6:8.1f} MB",
                flush=True,
            )
    result = {"environment": environment(device), "copy_gb_s": args.bandwidth / 1e9, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy bandwidth {args.bandwidth / 1e9:.1f} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
