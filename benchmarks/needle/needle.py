"""Needle in a haystack: does the model find one sentence hidden at some depth of a long text?

    python3 benchmarks/needle/needle.py --lengths 16k,32k --depths 5 --methods ltri,full --out DIR \
        [--haystack DIR_OF_TXT] [--device cuda] [--dtype bfloat16] [--max-new-tokens 32] [--budget N] [--window N]

For every (method, length, depth) cell: a haystack (the sorted .txt files of --haystack, concatenated and
repeated, or generated filler) trimmed by tokens so that haystack + needle is the context length, the
needle inserted at the sentence boundary nearest to depth % of the haystack's tokens, fed to a new Session
with that memory policy, then asked the question. Score: 1 if the answer holds "sandwich" and "dolores"
(case-insensitive), 0.5 if one, else 0. For the ltri policy, needle recall: per layer, the fraction of
answer steps (the question chunk and each decode step) whose resident set (sinks, retrieved spans,
window) held every token of the needle.

Writes DIR/cells/<method>_<length>_<depth>.json (cells already there are skipped: the run resumes),
DIR/config.json, DIR/summary.csv and, when matplotlib is importable, DIR/accuracy.png and
DIR/needle_recall.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ltri import LtriConfig, LtriError, MemoryConfig, RetrievalConfig, Session, SpanConfig, load_model
from ltri.config import MEMORY_POLICIES
from ltri.filler import filler_text
from ltri.provenance import git_dirty, git_sha
from ltri.span_memory import SpanMemory

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_TERMS = ("sandwich", "dolores")
BUNDLED_MODEL = "SmolLM2-135M-Instruct (bundled)"
# What a cell that ran out of memory records instead of an answer.
OOM_FIELDS = {
    "response": None,
    "score": None,
    "seconds": None,
    "feed_tok_s": None,
    "needle_span_retrieved": None,
    "needle_recall": None,
}
# Run settings that change what a cell measures: a run resuming in a directory must keep them.
CELL_SETTINGS = (
    "haystack",
    "model",
    "device",
    "dtype",
    "max_new_tokens",
    "budget",
    "window",
    "sink",
    "chunk_size",
    "index_vectors",
    "query_dims",
)


# ---- the run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NeedleRun:
    """One benchmark run: the grid of cells and how each is read. lengths in tokens, depths in percent."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    methods: tuple[str, ...]
    out: Path
    haystack: Path | None = None  # directory of .txt files; None: generated filler
    model: str | None = None  # None: the bundled SmolLM2
    device: str | None = None
    dtype: str | None = None
    max_new_tokens: int = 32
    budget: int = RetrievalConfig().budget
    window: int = MemoryConfig().n_window
    sink: int = MemoryConfig().n_sink
    chunk_size: int = LtriConfig().chunk_size
    index_vectors: str = SpanConfig().index_vectors
    query_dims: str = RetrievalConfig().query_dims

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("give at least one context length, each of 64 tokens or more")
        if not self.depths or not all(0 <= depth <= 100 for depth in self.depths):
            raise ValueError("depths must be percentages in [0, 100]")
        unknown = sorted(set(self.methods) - set(MEMORY_POLICIES))
        if not self.methods or unknown:
            raise ValueError(f"unknown methods {unknown}: choose among {', '.join(MEMORY_POLICIES)}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")

    def ltri_config(self, method: str) -> LtriConfig:
        return LtriConfig(
            memory=MemoryConfig(policy=method, n_sink=self.sink, n_window=self.window),
            spans=SpanConfig(index_vectors=self.index_vectors),
            retrieval=RetrievalConfig(budget=self.budget, query_dims=self.query_dims),
            chunk_size=self.chunk_size,
            device=self.device,
            dtype=self.dtype,
        )


def parse_lengths(text: str) -> tuple[int, ...]:
    """ "16k,32k,5000" -> (16384, 32768, 5000): k is 1024 tokens, as in benchmarks/speed."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        lengths.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """ "5" -> 5 depths evenly spaced over [0, 100] inclusive; "10,50,90" or "50%" -> those percentages."""
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if count < 2:
            raise ValueError("a depth count must be 2 or more (write one depth as e.g. '50%')")
        return tuple(round(100 * i / (count - 1), 4) for i in range(count))
    return tuple(float(item.strip().rstrip("%")) for item in text.split(",") if item.strip())


def format_depth(depth: float) -> str:
    return f"{depth:g}"


def cell_path(out: Path, method: str, length: int, depth: float) -> Path:
    return out / "cells" / f"{method}_{length}_{format_depth(depth)}.json"


# ---- the haystack and the needle -----------------------------------------------------------------------
@dataclass(frozen=True)
class Haystack:
    """Source text and the end character of each of its tokens (so that any token prefix is a text prefix)."""

    text: str
    token_ends: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ends)

    def prefix(self, n_tokens: int) -> str:
        return self.text[: self.token_ends[n_tokens - 1]] if n_tokens > 0 else ""

    def char_at_token(self, index: int) -> int:
        """Where token index starts (the text's end for index n_tokens)."""
        return 0 if index <= 0 else self.token_ends[min(index, self.n_tokens) - 1]


@dataclass(frozen=True)
class Context:
    """Haystack with the needle in it, as fed to the model."""

    text: str
    n_tokens: int  # tokens of text (haystack + needle), measured with the tokenizer
    needle_chars: tuple[int, int]  # [start, end) of the needle in text
    depth_percent: float  # requested depth
    actual_depth_percent: float  # where the needle's first character landed, in % of the text's tokens


def read_haystack_files(directory: Path) -> str:
    paths = sorted(directory.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"{directory} holds no .txt files to make a haystack of")
    texts = [path.read_text(encoding="utf-8", errors="replace").strip() for path in paths]
    return "\n\n".join(text for text in texts if text)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_haystack(tokenizer, text: str) -> Haystack:
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return Haystack(text, tuple(end for _, end in offsets))


def make_haystack(tokenizer, directory: Path | None, min_tokens: int) -> Haystack:
    """At least min_tokens tokens: the directory's text repeated, or filler grown until long enough."""
    if directory is not None:
        base = read_haystack_files(directory)
        repeats = math.ceil(min_tokens / max(1, count_tokens(tokenizer, base)))
        while True:
            haystack = tokenize_haystack(tokenizer, "\n\n".join([base] * repeats))
            if haystack.n_tokens >= min_tokens:
                return haystack
            repeats += 1
    n_sentences = min_tokens // 10 + 16
    while True:
        haystack = tokenize_haystack(tokenizer, filler_text(n_sentences, seed=0))
        if haystack.n_tokens >= min_tokens:
            return haystack
        n_sentences *= 2


def insertion_point(text: str, target: int) -> int:
    """The sentence boundary (after ". " or a period and any white space, or either end) nearest target."""
    boundaries = [0, len(text)] + [match.end() for match in re.finditer(r"\.\s+", text)]
    return min(boundaries, key=lambda boundary: (abs(boundary - target), boundary))


def insert_needle(text: str, at: int) -> tuple[str, tuple[int, int]]:
    """text with NEEDLE inserted at character at (a sentence boundary); returns it and the needle's [start, end)."""
    before, after = text[:at], text[at:]
    if before and not before[-1].isspace():
        before += " "
    if after and not after[0].isspace():
        after = " " + after
    return before + NEEDLE + after, (len(before), len(before) + len(NEEDLE))


def build_context(tokenizer, haystack: Haystack, length: int, depth: float) -> Context:
    """Haystack trimmed by tokens so that haystack + needle has length tokens (re-measured, corrected twice)."""
    n_haystack = length - count_tokens(tokenizer, " " + NEEDLE + " ")
    for _ in range(3):
        if not 1 <= n_haystack <= haystack.n_tokens:
            raise ValueError(f"the haystack has {haystack.n_tokens} tokens, {n_haystack} are needed")
        trimmed = haystack.prefix(n_haystack)
        at = insertion_point(trimmed, haystack.char_at_token(round(depth / 100 * n_haystack)))
        text, needle_chars = insert_needle(trimmed, at)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == length:
            break
        n_haystack += length - len(offsets)
    first = next(i for i, (_, end) in enumerate(offsets) if end > needle_chars[0])
    actual_depth = 100 * first / max(1, len(offsets) - 1)
    return Context(text, len(offsets), needle_chars, depth, round(actual_depth, 2))


def fed_token_ids(tokenizer, chat_format, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """What Session.feed(text) feeds into a new session, the way it tokenizes it: the opening of the
    first user turn, then the text (both while no token has been seen). Returns the ids and, for the
    ids of text, their character offsets in text (the opening's ids get (-1, -1))."""
    add_special = chat_format.add_special_tokens
    opening = chat_format.open_first_user
    opening_ids = tokenizer(opening, add_special_tokens=add_special)["input_ids"] if opening else []
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    offsets = [(-1, -1)] * len(opening_ids) + [tuple(offset) for offset in encoded["offset_mapping"]]
    return opening_ids + encoded["input_ids"], offsets


def needle_token_range(offsets: Sequence[tuple[int, int]], needle_chars: tuple[int, int]) -> tuple[int, int]:
    """[start, end) positions of the tokens that overlap the needle's characters, in the fed token stream."""
    start, end = needle_chars
    inside = [i for i, (first, last) in enumerate(offsets) if last > start and first < end and last > first]
    return inside[0], inside[-1] + 1


def score(response: str) -> float:
    found = sum(term in response.lower() for term in ANSWER_TERMS)
    return found / len(ANSWER_TERMS)


# ---- needle recall ---------------------------------------------------------------------------------------
@dataclass
class NeedleCoverage:
    """Per layer, one entry per retrieval step: which needle tokens [start, end) were resident.

    A step's masks stay where the memory keeps its positions until the answer is done, so that
    recording adds no device synchronization to the decode steps it watches.
    """

    start: int
    end: int
    steps: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)  # layer -> per step: masks

    def mask_parts(self, memory: SpanMemory) -> list[torch.Tensor]:
        """Masks (end - start,) bool of needle tokens in the sinks, the window, and the spans retrieved last."""
        parts = []
        for positions in (memory.sinks.positions(), memory.window.positions()):
            parts.append(torch.isin(torch.arange(self.start, self.end, device=positions.device), positions))
        needle = torch.arange(self.start, self.end)
        chosen = memory.last_retrieved.cpu()
        starts = memory.span_starts[chosen]
        ends = starts + memory.span_lengths[chosen]
        parts.append(((needle[:, None] >= starts[None]) & (needle[:, None] < ends[None])).any(dim=1))
        return parts

    def resident_mask(self, memory: SpanMemory) -> torch.Tensor:
        """(end - start,) bool on the CPU: needle tokens resident for the memory's last step."""
        return combine(self.mask_parts(memory))

    def record(self, memory: SpanMemory) -> None:
        self.steps.setdefault(memory.layer, []).append(self.mask_parts(memory))

    def per_layer(self, memories: Sequence[SpanMemory]) -> tuple[list[float], list[float], list[int]]:
        """Per layer: fraction of steps with the whole needle resident, mean fraction of needle tokens
        resident, steps recorded. A layer that never retrieved (it stored no span) counts its state now."""
        full, tokens, steps = [], [], []
        for memory in memories:
            masks = [combine(parts) for parts in self.steps.get(memory.layer, [])]
            steps.append(len(masks))
            masks = masks or [self.resident_mask(memory)]
            full.append(sum(float(mask.all()) for mask in masks) / len(masks))
            tokens.append(sum(float(mask.float().mean()) for mask in masks) / len(masks))
        return full, tokens, steps


def combine(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise or of masks that may live on different devices, on the CPU."""
    combined = masks[0].cpu()
    for mask in masks[1:]:
        combined = combined | mask.cpu()
    return combined


@contextmanager
def watch_needle(start: int, end: int) -> Iterator[NeedleCoverage]:
    """While inside, every SpanMemory retrieval records whether the needle [start, end) is resident."""
    coverage = NeedleCoverage(start, end)
    original = SpanMemory._retrieve

    def retrieve_and_record(memory, queries):
        result = original(memory, queries)
        coverage.record(memory)
        return result

    SpanMemory._retrieve = retrieve_and_record
    try:
        yield coverage
    finally:
        SpanMemory._retrieve = original


# ---- one cell ----------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_and_answer(session: Session, context: Context, run: NeedleRun) -> dict:
    """Feed the context, ask the question; timings, the answer and (ltri policy) the needle's coverage."""
    ids, offsets = fed_token_ids(session.tokenizer, session.chat_format, context.text)
    needle_start, needle_end = needle_token_range(offsets, context.needle_chars)
    synchronize(session.device)
    started = time.perf_counter()
    n_fed = session.feed(context.text)
    synchronize(session.device)
    fed = time.perf_counter()
    if n_fed != len(ids):
        raise RuntimeError(f"Session.feed fed {n_fed} tokens, the harness counted {len(ids)}: tokenization differs")
    with watch_needle(needle_start, needle_end) as coverage:
        response = session.ask(QUESTION, max_new_tokens=run.max_new_tokens)
    synchronize(session.device)
    answered = time.perf_counter()
    result = {
        "response": response,
        "seconds": answered - started,
        "feed_seconds": fed - started,
        "feed_tok_s": n_fed / (fed - started),
        "answer_tokens": len(session.last_answer_tokens),
        "needle_tokens": [needle_start, needle_end],
        "stats": asdict(session.stats()),
    }
    return result | recall_fields(session, coverage)


def recall_fields(session: Session, coverage: NeedleCoverage) -> dict:
    if session.config.memory.policy != "ltri":
        return {
            "needle_span_retrieved": None,
            "needle_recall": None,
            "needle_token_coverage": None,
            "retrieval_steps": None,
        }
    full, tokens, steps = coverage.per_layer(session.cache.memories())
    return {
        "needle_span_retrieved": full,
        "needle_recall": sum(full) / len(full),
        "needle_token_coverage": tokens,
        "retrieval_steps": steps,
    }


def run_cell(model, tokenizer, run: NeedleRun, method: str, context: Context) -> dict:
    """One cell's record; a CUDA out-of-memory error becomes status "oom" (score null), others propagate."""
    config = run.ltri_config(method)
    record = {
        "model": run.model or BUNDLED_MODEL,
        "method": method,
        "context_length": context.n_tokens,
        "target_length": None,  # filled by the caller
        "depth_percent": context.depth_percent,
        "actual_depth_percent": context.actual_depth_percent,
        "needle": NEEDLE,
        "question": QUESTION,
        "haystack": str(run.haystack) if run.haystack else "filler",
        "config": asdict(config) | {"max_new_tokens": run.max_new_tokens},
    }
    session = Session(model, config, tokenizer=tokenizer)
    try:
        result = read_and_answer(session, context, run)
    except torch.cuda.OutOfMemoryError as error:
        result = {"status": "oom", "error": str(error).split("\n")[0]}
    finally:
        session.close()
    if "status" in result:
        del session
        torch.cuda.empty_cache()
        return record | result | OOM_FIELDS
    return record | {"status": "ok", "score": score(result["response"])} | result


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all: a cell interrupted mid-write is not taken for done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


# ---- the run: config, cells, summary ---------------------------------------------------------------------
def environment(device: torch.device, argv: Sequence[str]) -> dict:
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
    }


def run_args(run: NeedleRun) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(run).items()}


def previous_runs(run: NeedleRun) -> list[dict]:
    """The configs of earlier runs in run.out, oldest first; refuses a resume that would measure differently."""
    path = run.out / "config.json"
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    changed = [key for key in CELL_SETTINGS if previous["args"].get(key) != run_args(run)[key]]
    if changed:
        raise ValueError(
            f"{run.out} holds cells made with other {', '.join(changed)}: give a new --out for these settings"
        )
    return previous.pop("previous_runs", []) + [previous]


def write_run_config(run: NeedleRun, model, argv: Sequence[str], earlier: list[dict]) -> None:
    device = next(model.parameters()).device
    config = {
        "args": run_args(run),
        "needle": NEEDLE,
        "question": QUESTION,
        "model": run.model or BUNDLED_MODEL,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "environment": environment(device, argv),
        "previous_runs": earlier,
    }
    write_json(run.out / "config.json", config)


def run_cells(run: NeedleRun, model, tokenizer) -> None:
    """Every cell of the grid whose JSON is not there yet."""
    haystack = None
    for length in run.lengths:
        for depth in run.depths:
            todo = [method for method in run.methods if not cell_path(run.out, method, length, depth).exists()]
            if not todo:
                continue
            if haystack is None:
                haystack = make_haystack(tokenizer, run.haystack, max(run.lengths) + 64)
            context = build_context(tokenizer, haystack, length, depth)
            for method in todo:
                record = run_cell(model, tokenizer, run, method, context) | {"target_length": length}
                write_json(cell_path(run.out, method, length, depth), record)
                print_cell(record)


def print_cell(record: dict) -> None:
    recall = "" if record["needle_recall"] is None else f"  needle recall {record['needle_recall']:.2f}"
    if record["status"] == "oom":
        outcome = "out of memory"
    else:
        outcome = f"score {record['score']:.1f}{recall}  {record['seconds']:.1f} s  answer {record['response']!r}"
    print(
        f"{record['method']:>9} {record['context_length']:>7} tokens  depth {record['depth_percent']:>5g}%  {outcome}",
        flush=True,
    )


def load_cells(run: NeedleRun) -> dict[tuple[str, int, float], dict]:
    cells = {}
    for method in run.methods:
        for length in run.lengths:
            for depth in run.depths:
                path = cell_path(run.out, method, length, depth)
                if path.exists():
                    cells[method, length, depth] = json.loads(path.read_text())
    return cells


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_rows(run: NeedleRun, cells: dict[tuple[str, int, float], dict]) -> list[dict]:
    """One row per (method, target length): mean score and needle recall over its depths (oom cells excluded)."""
    rows = []
    for method in run.methods:
        for length in run.lengths:
            group = [cells[key] for key in cells if key[:2] == (method, length)]
            scored = [cell["score"] for cell in group if cell["score"] is not None]
            recalls = [cell["needle_recall"] for cell in group if cell["needle_recall"] is not None]
            rows.append(
                {
                    "method": method,
                    "context_length": length,
                    "accuracy": mean(scored),
                    "needle_recall": mean(recalls),
                    "cells": len(group),
                    "oom": sum(cell["status"] == "oom" for cell in group),
                }
            )
    return rows


def write_summary(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
    def show(value):
        return "-" if value is None else f"{value:.2f}"

    print(f"{'method':>9} {'length':>7} {'accuracy':>8} {'recall':>7} {'cells':>5} {'oom':>4}")
    for row in rows:
        print(
            f"{row['method']:>9} {row['context_length']:>7} {show(row['accuracy']):>8} "
            f"{show(row['needle_recall']):>7} {row['cells']:>5} {row['oom']:>4}"
        )


def plot_heatmaps(run: NeedleRun, cells: dict[tuple[str, int, float], dict]) -> list[Path]:
    """accuracy.png and needle_recall.png: rows depths, columns lengths, one panel per method. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key, title in (("score", "accuracy"), ("needle_recall", "needle_recall")):
        methods = [m for m in run.methods if any(k[0] == m and cells[k][key] is not None for k in cells)]
        if not methods:
            continue
        size = (len(methods) * (2.4 + 0.9 * len(run.lengths)), 1.8 + 0.4 * len(run.depths))
        figure, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False)
        for axis, method in zip(axes[0], methods, strict=True):
            draw_panel(axis, run, cells, method, key)
        figure.suptitle(title.replace("_", " "))
        figure.tight_layout()
        figure.savefig(run.out / f"{title}.png", dpi=120)
        plt.close(figure)
        written.append(run.out / f"{title}.png")
    return written


def draw_panel(axis, run: NeedleRun, cells: dict, method: str, key: str) -> None:
    grid = [[math.nan] * len(run.lengths) for _ in run.depths]
    for row, depth in enumerate(run.depths):
        for column, length in enumerate(run.lengths):
            cell = cells.get((method, length, depth), {})
            if cell.get(key) is not None:
                grid[row][column] = cell[key]
            if cell.get(key) is not None or cell.get("status") == "oom":
                label = "oom" if cell[key] is None else f"{cell[key]:.2f}"
                axis.text(column, row, label, ha="center", va="center", fontsize=8)
    axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(run.lengths)), [f"{length / 1024:g}k" for length in run.lengths])
    axis.set_yticks(range(len(run.depths)), [f"{format_depth(depth)}%" for depth in run.depths])
    axis.set_xlabel("context length (tokens)")
    if axis.get_subplotspec().colspan.start == 0:
        axis.set_ylabel("needle depth")
    axis.set_title(method)


# ---- command line ----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> NeedleRun:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2k,4k,8k", help="context lengths in tokens, k = 1024 (16k,32k)")
    parser.add_argument("--depths", default="5", help="a count evenly spaced over 0..100%%, or a list (10,50,90)")
    parser.add_argument("--methods", default="ltri,full", help=f"memory policies among {','.join(MEMORY_POLICIES)}")
    parser.add_argument("--out", type=Path, required=True, help="result directory (a run there resumes)")
    parser.add_argument("--haystack", type=Path, default=None, help="directory of .txt files (default: filler)")
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled SmolLM2)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=int, default=RetrievalConfig().budget, help="retrieved tokens per step")
    parser.add_argument("--window", type=int, default=MemoryConfig().n_window, help="local window tokens")
    parser.add_argument("--sink", type=int, default=MemoryConfig().n_sink, help="attention-sink tokens")
    parser.add_argument("--chunk-size", type=int, default=LtriConfig().chunk_size)
    parser.add_argument("--index-vectors", default=SpanConfig().index_vectors, help="keys or bounds")
    parser.add_argument("--query-dims", default=RetrievalConfig().query_dims, help="all or long_range")
    args = parser.parse_args(argv)
    if args.haystack is not None and not any(args.haystack.glob("*.txt")):
        parser.error(f"--haystack {args.haystack} is not a directory with .txt files")
    try:
        run = NeedleRun(
            lengths=parse_lengths(args.lengths),
            depths=parse_depths(args.depths),
            methods=tuple(method.strip() for method in args.methods.split(",")),
            out=args.out,
            haystack=args.haystack,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
            budget=args.budget,
            window=args.window,
            sink=args.sink,
            chunk_size=args.chunk_size,
            index_vectors=args.index_vectors,
            query_dims=args.query_dims,
        )
        for method in run.methods:
            run.ltri_config(method)  # its invariants: budget, window, sinks
    except (ValueError, LtriError) as error:
        parser.error(str(error).rstrip("."))
    return run


def main(argv: Sequence[str] | None = None, preloaded: tuple | None = None) -> list[dict]:
    """Run the benchmark; returns the summary rows. preloaded: (model, tokenizer) to use instead of loading."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run = parse_args(argv)
    try:
        earlier = previous_runs(run)
    except ValueError as error:
        sys.exit(f"needle: {error}")
    model, tokenizer = preloaded or load_model(run.model, device=run.device, dtype=run.dtype)
    run.out.mkdir(parents=True, exist_ok=True)
    write_run_config(run, model, argv, earlier)
    run_cells(run, model, tokenizer)
    cells = load_cells(run)
    rows = summary_rows(run, cells)
    write_summary(run.out / "summary.csv", rows)
    plot_heatmaps(run, cells)
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
