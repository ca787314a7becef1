"""Torch operations a prefill chunk issues, by the ltri function that issued them: a CPU proxy of the host's work.

    python3 benchmarks/speed/prefill_ops.py                     # 16K tokens, then 2 chunks of 2048 counted
    python3 benchmarks/speed/prefill_ops.py --tokens 16k --top 30 --out FILE

On a GPU the ltri Session is host-bound (benchmarks/speed/NOTES.md steps 14-15): every torch operation costs
Python and dispatch time, and most launch a kernel. This script counts them on the CPU, where no device time
hides them, on a 32-layer Llama of small width (hidden 256, 4 query heads, 2 KV heads, head dim 64) set up as
the GPU runs it: 2048-token chunks, the torch span index, every layer's chunk cut in one batched segmentation,
and the stored tokens kept in host rows. A TorchDispatchMode counts each aten operation once and charges it to
the innermost frame in ltri/ or kernels/ (repeat.py and growth.py charged to their caller), or to transformers.
Kernels run their torch references here, so their counts are not the GPU's launches (one a call there); the
rest of the code runs as on the GPU. Prints one JSON object: total operations per chunk and the top functions.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402

import ltri.deferred_segmentation as deferred_segmentation  # noqa: E402
from ltri.config import LtriConfig  # noqa: E402
from ltri.provenance import git_dirty, git_sha  # noqa: E402
from ltri.session import Session  # noqa: E402
from ltri.span_batch import segment_many  # noqa: E402

SHAPE = e2e.ModelShape(256, 256, 32, 4, 2, 64, 512, 500000.0)
CHUNK = 2048
CHARGED_TO_CALLER = ("repeat.py", "growth.py")


class CountOps(TorchDispatchMode):
    """Counts aten operations by the ltri (or transformers) function that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[issuer(sys._getframe(1))] += 1
        return func(*args, **(kwargs or {}))


def issuer(frame) -> str:
    while frame is not None:
        path = frame.f_code.co_filename
        if ("/ltri/" in path or "/kernels/" in path) and not path.endswith(CHARGED_TO_CALLER):
            return f"{Path(path).parent.name}/{Path(path).name}:{frame.f_code.co_name}"
        if "transformers" in path:
            return f"transformers:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


def batched_segmentation(*args, **kwargs):
    """segment_many as it runs on a GPU: one batched pass for all blocks (the CPU default is one block at a time)."""
    return segment_many(*args, **{**kwargs, "batched": True})


def gpu_like_config() -> LtriConfig:
    config = LtriConfig(device="cpu")
    return replace(
        config,
        chunk_size=CHUNK,
        retrieval=replace(config.retrieval, backend="torch"),
        memory=replace(config.memory, host_payloads="always"),
    )


def count(tokens: int, chunks: int) -> tuple[float, collections.Counter]:
    deferred_segmentation.segment_many = batched_segmentation
    model = e2e.build_model(SHAPE, torch.device("cpu"), torch.float32, 0)
    ids = e2e.context_ids(tokens + chunks * CHUNK, SHAPE.vocab, 0)
    counter = CountOps()
    with tempfile.TemporaryDirectory() as folder:
        session = Session(model, gpu_like_config(), tokenizer=e2e.TokenIdsOnly(), store=Path(folder) / "store")
        try:
            session.prefill(ids[:tokens])
            with counter:
                session.prefill(ids[tokens:])
        finally:
            session.close()
    return sum(counter.counts.values()) / chunks, counter.counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16k", help="context read before the counted chunks")
    parser.add_argument("--chunks", type=int, default=2, help="2048-token chunks counted")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    total, counts = count(e2e.parse_length(args.tokens), args.chunks)
    row = {
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "command": shlex.join(["python3", "benchmarks/speed/prefill_ops.py", *argv]),
        "tokens_before": e2e.parse_length(args.tokens),
        "chunks_counted": args.chunks,
        "ops_per_chunk": total,
        "top": {name: n / args.chunks for name, n in counts.most_common(args.top)},
    }
    text = json.dumps(row, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
