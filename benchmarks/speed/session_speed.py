"""Session prefill and decode speed of the memory policies, against full attention in the same run.

    python benchmarks/speed/session_speed.py --lengths 2k,8k --methods transformers,full,streaming \
        --out benchmarks/speed/results/session_speed_cpu.json

For each method and context length: prefill tokens/s (chunked), decode ms/token (one token at a
time after the prefill), resident tokens and KV bytes (allocated). Methods: ``transformers`` (the
baseline: its own sdpa attention and DynamicCache, same chunking) and ltri's memory policies
(``full``, ``streaming``) through the Session. The physical floor of
a decode step is the bytes it must read (weights + resident KV) divided by the copy bandwidth
measured in the same run. Model: the bundled SmolLM2 unless --model is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ltri import LtriConfig, MemoryConfig, Session, load_model
from ltri.cache import cache_argument_name
from ltri.filler import filler_text
from ltri.provenance import git_sha
from ltri.timing import copy_bandwidth, synchronize


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def context_ids(tokenizer, n_tokens: int) -> list[int]:
    ids: list[int] = []
    seed = 0
    while len(ids) < n_tokens:
        ids += tokenizer(filler_text(400, seed=seed), add_special_tokens=False)["input_ids"]
        seed += 1
    return ids[:n_tokens]


def time_reading(forward, ids: list[int], chunk: int, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    """forward(token_ids (q_len,)) runs one forward. Returns (prefill tokens/s, median decode ms/token)."""
    tensor = torch.tensor(ids, device=device)
    synchronize(device)
    start = time.perf_counter()
    for offset in range(0, len(ids), chunk):
        forward(tensor[offset : offset + chunk])
    synchronize(device)
    prefill_tok_s = len(ids) / (time.perf_counter() - start)
    step_times = []
    for token in tensor[:decode_tokens]:
        synchronize(device)
        start = time.perf_counter()
        forward(token[None])
        synchronize(device)
        step_times.append(time.perf_counter() - start)
    return prefill_tok_s, 1000 * statistics.median(step_times)


def measure_transformers(model, ids: list[int], args) -> dict:
    """The baseline: transformers' own sdpa attention with its DynamicCache, the same chunking."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    model.set_attn_implementation("sdpa")
    cache_argument = {cache_argument_name(model): cache}

    @torch.inference_mode()
    def forward(chunk):
        model(input_ids=chunk[None], use_cache=True, logits_to_keep=1, **cache_argument)

    try:
        prefill_tok_s, decode_ms = time_reading(forward, ids, args.chunk, args.decode_tokens, device)
    finally:
        model.set_attn_implementation("ltri")
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return row("transformers", len(ids), prefill_tok_s, decode_ms, cache.get_seq_length(), kv_bytes, model, args)


def measure_policy(model, tokenizer, policy: str, ids: list[int], args) -> dict:
    memory = MemoryConfig(policy=policy, n_sink=args.sink, n_window=args.window)
    session = Session(model, LtriConfig(memory=memory, chunk_size=args.chunk), tokenizer=tokenizer)
    prefill_tok_s, decode_ms = time_reading(session.prefill, ids, args.chunk, args.decode_tokens, session.device)
    stats = session.stats()
    resident, kv_bytes = stats.resident_tokens, stats.memory_bytes
    return row(f"ltri-{policy}", len(ids), prefill_tok_s, decode_ms, resident, kv_bytes, model, args)


def row(method, n_tokens, prefill_tok_s, decode_ms, resident_tokens, kv_bytes, model, args) -> dict:
    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": method,
        "context_len": n_tokens,
        "prefill_tok_s": prefill_tok_s,
        "decode_ms": decode_ms,
        "decode_floor_ms": 1000 * (weight_bytes + kv_bytes) / args.bandwidth,
        "resident_tokens": resident_tokens,
        "kv_bytes": kv_bytes,
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def measure(model, tokenizer, method: str, ids: list[int], args) -> dict:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if method == "transformers":
        return measure_transformers(model, ids, args)
    return measure_policy(model, tokenizer, method, ids, args)


def environment(device: torch.device) -> dict:
    import transformers

    sha = git_sha()
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
    parser.add_argument("--methods", default="transformers,full,streaming", help="transformers and ltri policies")
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
    methods = args.methods.split(",")
    for method in methods:  # warm-up: first kernels, allocator, lazy imports
        measure(model, tokenizer, method, context_ids(tokenizer, 1024), args)
    rows = []
    for n_tokens in [parse_length(x) for x in args.lengths.split(",")]:
        ids = context_ids(tokenizer, n_tokens)
        for method in methods:
            result = measure(model, tokenizer, method, ids, args)
            rows.append(result)
            print(
                f"{result['method']:>14} {result['context_len']:>7} tokens  "
                f"prefill {result['prefill_tok_s']:8.0f} tok/s  "
                f"decode {result['decode_ms']:7.2f} ms (floor {result['decode_floor_ms']:.2f})  "
                f"resident {result['resident_tokens']:>7}  kv {result['kv_bytes'] / 1e6:8.1f} MB",
                flush=True,
            )
    result = {"environment": environment(device), "copy_gb_s": args.bandwidth / 1e9, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"copy bandwidth {args.bandwidth / 1e9:.1f} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
