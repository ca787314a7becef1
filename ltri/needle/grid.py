"""The resumable run of the grid: one JSON per (method, length, depth) cell, written whole or not at all;
cells already there are skipped."""

from __future__ import annotations

import json
from pathlib import Path

from ltri.needle import cell
from ltri.needle.haystack import build_context, make_haystack
from ltri.needle.settings import NeedleRun, format_depth
from ltri.needle.tasks import make_probe

HAYSTACK_MARGIN = 64  # tokens the haystack holds beyond the longest context, so that any trim fits


def cell_path(out: Path, method: str, length: int, depth: float) -> Path:
    return out / "cells" / f"{method}_{length}_{format_depth(depth)}.json"


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all: a cell interrupted mid-write is not taken for done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


def run_cells(run: NeedleRun, model, tokenizer) -> None:
    """Every cell of the grid whose JSON is not there yet; the methods of a cell share its context."""
    haystack = None
    for length in run.lengths:
        for depth in run.depths:
            todo = [method for method in run.methods if not cell_path(run.out, method, length, depth).exists()]
            if not todo:
                continue
            if haystack is None:
                haystack = make_haystack(tokenizer, run.haystack, max(run.lengths) + HAYSTACK_MARGIN)
            probe = make_probe(run.task, run.seed, length, depth)
            context = build_context(tokenizer, haystack, length, depth, probe.sentence)
            for method in todo:
                record = cell.run_cell(model, tokenizer, run, method, context, probe) | {"target_length": length}
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
    """The cells of the run's grid found in run.out, by (method, length, depth)."""
    cells = {}
    for method in run.methods:
        for length in run.lengths:
            for depth in run.depths:
                path = cell_path(run.out, method, length, depth)
                if path.exists():
                    cells[method, length, depth] = json.loads(path.read_text())
    return cells
