"""Where an ltri ingest spends its time: cProfile of Session.feed with the bundled model, by function.

    python3 benchmarks/speed/profile_ingest.py --sentences 400 --out benchmarks/speed/results/profile_ingest_cpu.json
    python3 benchmarks/speed/profile_ingest.py --device cuda --dtype bfloat16 --sentences 3000 \
        --out benchmarks/speed/results/profile_ingest_h100.json

A first feed fills the window (so spans are stored and retrieved), then the second feed is profiled.
Rows: the functions that matter for the span memory, with their cumulative seconds and share of the feed;
"self" rows: the functions with the most time of their own (on CUDA, the ones that wait for the device,
such as .item(), .tolist() and .cpu(), show up here).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from ltri import LtriConfig, Session, load_model
from ltri.filler import filler_text
from ltri.provenance import git_sha

WATCHED = {
    "scaled_dot_product_attention": "attention over the resident set (SDPA)",
    "linear": "linear layers",
    "chunk_self_attention": "chunk self-attention for segmentation",
    "segment_many": "segmentation (every layer's chunk in one call)",
    "top_attended_keys": "index vectors (most attended keys)",
    "_retrieve": "retrieval (index search, votes, loading spans)",
    "_evict": "eviction (LMDB write, index add)",
    "cat": "torch.cat",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-size", type=int, default=LtriConfig().chunk_size)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(None, device=args.device, dtype=args.dtype)
    text = filler_text(args.sentences, seed=5)
    config = LtriConfig(chunk_size=args.chunk_size, device=args.device, dtype=args.dtype)
    with Session(model, config, tokenizer=tokenizer) as session:
        session.feed(text[: len(text) // 3])
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        n_tokens = session.feed(text)
        profile.disable()
        seconds = time.perf_counter() - started
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    rows = []
    for (file, _, name), (calls, _, _, cumulative, _) in stats.items():
        function = name.strip("<>").split()[-1].split(".")[-1]  # "<built-in method torch._C._nn.linear>" -> linear
        ours = file == "~" or Path(file).name in ("span_memory.py", "attention.py")
        if ours and function in WATCHED:
            rows.append({"function": function, "what": WATCHED[function], "calls": calls, "seconds": cumulative})
    rows.sort(key=lambda row: -row["seconds"])
    for row in rows:
        row["share"] = row["seconds"] / seconds
        print(f"{row['what']:50s} {row['seconds']:7.2f} s  {100 * row['share']:5.1f}%")
    self_rows = sorted(stats.items(), key=lambda item: -item[1][2])[:30]
    self_rows = [
        {"function": f"{Path(file).name}:{line}:{name}", "calls": calls, "self_seconds": own}
        for (file, line, name), (calls, _, own, _, _) in self_rows
    ]
    for row in self_rows[:15]:
        print(f"self {row['function'][:70]:70s} {row['self_seconds']:7.2f} s  {row['calls']} calls")
    print(f"feed: {n_tokens} tokens in {seconds:.1f} s = {n_tokens / seconds:.0f} tok/s (profiled)")
    result = {
        "env": {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "git_sha": git_sha(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "dtype": args.dtype,
            "chunk_size": args.chunk_size,
        },
        "command": " ".join(sys.argv),
        "tokens": n_tokens,
        "seconds": seconds,
        "rows": rows,
        "self": self_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
