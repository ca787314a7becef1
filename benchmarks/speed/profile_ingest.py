"""Where an ltri ingest spends its time: cProfile of Session.feed with the bundled model, by function.

    python3 benchmarks/speed/profile_ingest.py --sentences 400 --out benchmarks/speed/results/profile_ingest_cpu.json

A first feed fills the window (so spans are stored and retrieved), then the second feed is profiled.
Rows: the functions that matter for the span memory, with their cumulative seconds and share of the feed.
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
    "_segment": "segmentation and index vectors",
    "_retrieve": "retrieval (index search, votes, loading spans)",
    "_evict": "eviction (LMDB write, index add)",
    "cat": "torch.cat",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(None, device="cpu", dtype="float32")
    text = filler_text(args.sentences, seed=5)
    with Session(model, LtriConfig(), tokenizer=tokenizer) as session:
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
    print(f"feed: {n_tokens} tokens in {seconds:.1f} s = {n_tokens / seconds:.0f} tok/s (profiled)")
    result = {
        "env": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "git_sha": git_sha()},
        "command": " ".join(sys.argv),
        "tokens": n_tokens,
        "seconds": seconds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
