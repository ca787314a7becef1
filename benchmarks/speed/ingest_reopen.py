"""Ingest speed (ltri against full attention), reopen time of a saved store and time to first token after it.

    python3 benchmarks/speed/ingest_reopen.py --tokens 16384 --out benchmarks/speed/results/ingest_reopen_cpu.json

Both policies read the same generated text in the same run with the bundled model. Reopening is
timed in a fresh process (model load included, as a user's `ltri ask --store DIR` pays it) and in
this process with the model already loaded (the store alone).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ltri import LtriConfig, MemoryConfig, Session, load_model
from ltri.filler import filler_text
from ltri.provenance import git_sha

QUESTION = "Who cycled to the bridge?"
REOPEN_AND_ASK = """
import sys, time
started = time.perf_counter()
from ltri import Session
session = Session.open(sys.argv[1], config=None)
opened = time.perf_counter()
next(iter(session.stream(sys.argv[2], max_new_tokens=4)))
print(opened - started, time.perf_counter() - opened)
"""


def text_of(tokenizer, n_tokens: int) -> str:
    text = filler_text(n_tokens // 8, seed=5)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def ingest(model, tokenizer, text: str, policy: str, store: Path | None) -> tuple[Session, float, int]:
    config = LtriConfig(memory=MemoryConfig(policy=policy), device=str(model.device))
    session = Session(model, config, tokenizer=tokenizer, store=store)
    started = time.perf_counter()
    n_tokens = session.feed(text)
    return session, time.perf_counter() - started, n_tokens


def first_token_seconds(session: Session) -> float:
    started = time.perf_counter()
    next(iter(session.stream(QUESTION, max_new_tokens=4)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(None, device=args.device)
    text = text_of(tokenizer, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        for policy in ("full", "ltri"):
            session, seconds, n_tokens = ingest(model, tokenizer, text, policy, store if policy == "ltri" else None)
            row = {"policy": policy, "tokens": n_tokens, "ingest_s": seconds, "ingest_tok_s": n_tokens / seconds}
            if policy == "ltri":
                started = time.perf_counter()
                session.save()
                row["save_s"] = time.perf_counter() - started
                row["store_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
                row["spans"] = session.stats().spans
            session.close()
            rows.append(row)
            print(row, flush=True)
        started = time.perf_counter()
        reopened = Session.open(store, model=model, tokenizer=tokenizer)
        reopen = {"reopen_loaded_model_s": time.perf_counter() - started}
        reopen["first_token_after_reopen_s"] = first_token_seconds(reopened)
        reopened.close()
        fresh = subprocess.run(
            [sys.executable, "-c", REOPEN_AND_ASK, str(store), QUESTION], capture_output=True, text=True, check=True
        )
        open_s, first_s = (float(x) for x in fresh.stdout.split()[-2:])
        reopen["reopen_fresh_process_s"] = open_s
        reopen["first_token_fresh_process_s"] = first_s
    print(reopen)
    result = {
        "env": {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "git_sha": git_sha(),
            "command": " ".join(sys.argv),
        },
        "ingest": rows,
        "reopen": reopen,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
