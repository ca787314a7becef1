"""How much of a decode step's rows its layer's row caches already hold: the overlap of consecutive steps.

    python3 benchmarks/speed/cache_overlap.py --lengths 8k,32k --selectors none,loki,sparq --budget 2048 \
        --select-tokens 512 --decode-tokens 32 --haystack DIR --out benchmarks/speed/results/cache_overlap_cpu.json

A captured decode step keeps, per layer, the rows it read last on the device (``ltri.offload.row_cache``): the
retrieved rows without a token selector, each KV head's selected rows with one, and the candidates' keys (SparQ) or
projections (Loki). What that saves depends on how much of a step's rows the last step read too. Speed runs on the GPU
use random weights (``e2e.py``), whose steps need not overlap as a trained model's do; this runs a trained model (the
bundled SmolLM2 unless --model) on real text (the haystack directory's .txt files, else ltri's filler) with its
stored tokens in host rows (``MemoryConfig.host_payloads="always"``: on a CPU the captured step's code runs eagerly,
with the same caches) and counts, for each context length and selector, the rows found in each cache over the
decode steps after the first (whose caches start empty): ``CapturedDecode.cache_hits``. Greedy decode continues
the text, or with --question answers it as ``ltri chat`` does (the question, the reread of its evidence, then the
answer's steps; counted from the answer's first piece, which is its first step unless that step completes no
character). Each row also gives the share found between each count and the next, and how the steps went (bound,
eager, replayed, declined).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from itertools import pairwise
from pathlib import Path

import torch

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, load_model
from ltri.captured_decode import CACHE_KINDS
from ltri.filler import filler_text
from ltri.needle.haystack import read_haystack_files
from ltri.provenance import git_sha


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8k", help="context lengths in tokens (e.g. 8k,32k)")
    parser.add_argument("--selectors", default="none,loki,sparq", help="RetrievalConfig.selector values")
    parser.add_argument("--budget", type=int, default=2048, help="retrieved tokens a step")
    parser.add_argument("--select-tokens", type=int, default=512, help="tokens each KV head keeps (loki, sparq)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--question", default=None, help="answer it (Session.stream) instead of continuing the text")
    parser.add_argument("--haystack", type=Path, default=None, help="a directory of .txt files (default: filler)")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def document_ids(tokenizer, haystack: Path | None, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of the haystack's text (repeated as needed) or of filler text."""
    base = read_haystack_files(haystack) if haystack is not None else None
    ids: list[int] = []
    seed = 0
    while len(ids) < n_tokens:
        text = base if base is not None else filler_text(400, seed=seed)
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        seed += 1
    return ids[:n_tokens]


def session_config(args: argparse.Namespace, selector: str) -> LtriConfig:
    select_tokens = args.select_tokens
    retrieval = RetrievalConfig(budget=args.budget, backend="torch", selector=selector, select_tokens=select_tokens)
    return LtriConfig(device=args.device, memory=MemoryConfig(host_payloads="always"), retrieval=retrieval)


def cache_counts(session: Session) -> dict[str, list[int] | None]:
    captured = session._captured
    return {kind: None if captured is None else captured.cache_hits(kind) for kind in CACHE_KINDS}


def shares_found(before: dict, after: dict) -> dict[str, float | None]:
    """Each cache's rows found / rows read between two cache_counts."""
    shares = {}
    for kind in CACHE_KINDS:
        if after[kind] is None:
            shares[kind] = None
            continue
        found, read = (a - b for a, b in zip(after[kind], before[kind] or [0, 0], strict=True))
        shares[kind] = found / read if read else None
    return shares


def continuation_counts(session: Session, ids: list[int], n_steps: int) -> list[dict]:
    """cache_counts after each of n_steps greedy decode steps that continue the text ids."""
    logits = session.prefill(ids)
    counts = []
    for _ in range(n_steps):
        logits = session.prefill([int(logits[-1].argmax())])
        counts.append(cache_counts(session))
    return counts


def answer_counts(session: Session, ids: list[int], question: str, n_steps: int) -> list[dict]:
    """cache_counts after each piece of the answer to question (``Session.stream``: the question, its reread, then
    at most n_steps decode steps, a piece after each step that completes one)."""
    session.prefill(ids)
    return [cache_counts(session) for _ in session.stream(question, max_new_tokens=n_steps)]


def measure(model, tokenizer, ids: list[int], selector: str, args: argparse.Namespace) -> dict:
    session = Session(model, session_config(args, selector), tokenizer=tokenizer)
    try:
        if args.question is None:
            counts = continuation_counts(session, ids, args.decode_tokens)
        else:
            counts = answer_counts(session, ids, args.question, args.decode_tokens)
        steps = dict(session._captured.steps) if session._captured is not None else {}
    finally:
        session.close()
    after_first = shares_found(counts[0], counts[-1])  # the first step's caches start empty
    return {
        "context_len": len(ids),
        "selector": selector,
        "budget": args.budget,
        "select_tokens": args.select_tokens if selector != "none" else None,
        "question": args.question,
        "decode_tokens": args.decode_tokens,
        "captured_steps": steps,
        **{f"{kind}_found": after_first[kind] for kind in CACHE_KINDS},
        **{f"{kind}_counts": [counts[0][kind], counts[-1][kind]] for kind in CACHE_KINDS},
        **{f"{kind}_found_by_step": [shares_found(a, b)[kind] for a, b in pairwise(counts)] for kind in CACHE_KINDS},
    }


def environment(model, args: argparse.Namespace, argv: list[str]) -> dict:
    device = next(model.parameters()).device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": args.model or "bundled SmolLM2",
        "dtype": str(next(model.parameters()).dtype),
        "text": str(args.haystack) if args.haystack is not None else "ltri.filler",
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "command": shlex.join(["python3", "benchmarks/speed/cache_overlap.py", *argv]),
    }


def print_row(row: dict) -> None:
    shares = "  ".join(f"{kind} {row[f'{kind}_found']:.3f}" for kind in CACHE_KINDS if row[f"{kind}_found"] is not None)
    print(f"{row['context_len']:>7} tokens  {row['selector']:>5}  found: {shares}  steps {row['captured_steps']}")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = []
    for n_tokens in (parse_length(length) for length in args.lengths.split(",")):
        ids = document_ids(tokenizer, args.haystack, n_tokens)
        for selector in args.selectors.split(","):
            rows.append(measure(model, tokenizer, ids, selector, args))
            print_row(rows[-1])
    result = {"environment": environment(model, args, argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
