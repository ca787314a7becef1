"""The benchmark's entry points: main(argv) parses the script's options (argparse); run_benchmark(run)
runs a parsed NeedleRun (what `ltri needle` calls) and returns the summary rows."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ltri.config import SELECTORS, VOTES, LtriConfig, MemoryConfig, RetrievalConfig, SpanConfig
from ltri.errors import LtriError
from ltri.model import load_model
from ltri.needle import report
from ltri.needle.grid import load_cells, run_cells
from ltri.needle.run_config import previous_runs, write_run_config
from ltri.needle.settings import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    DEFAULT_METHODS,
    HELP,
    NeedleRun,
    parse_depths,
    parse_lengths,
    parse_methods,
)
from ltri.needle.tasks import TASKS

DESCRIPTION = "Needle in a haystack: does the model find one sentence hidden at some depth of a long text?"


def make_run(lengths: str, depths: str, methods: str, out: Path, haystack: Path | None = None, **options) -> NeedleRun:
    """A NeedleRun from option values as the command lines give them; ValueError or LtriError names what is wrong.
    options: the other NeedleRun fields."""
    if haystack is not None and not any(Path(haystack).glob("*.txt")):
        raise ValueError(f"--haystack {haystack} is not a directory with .txt files")
    run = NeedleRun(
        lengths=parse_lengths(lengths),
        depths=parse_depths(depths),
        methods=parse_methods(methods),
        out=Path(out),
        haystack=None if haystack is None else Path(haystack),
        **options,
    )
    for method in run.methods:
        run.ltri_config(method)  # its invariants: budget, window, sinks
    return run


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION)

    def add(name: str, **kwargs) -> None:
        parser.add_argument(f"--{name.replace('_', '-')}", help=HELP[name].replace("%", "%%"), **kwargs)

    add("lengths", default=DEFAULT_LENGTHS)
    add("depths", default=DEFAULT_DEPTHS)
    add("methods", default=DEFAULT_METHODS)
    add("task", default=NeedleRun.task, choices=TASKS)
    add("seed", type=int, default=NeedleRun.seed)
    add("out", type=Path, required=True)
    add("haystack", type=Path, default=None)
    add("model", default=None)
    add("device", default=None)
    add("dtype", default=None, choices=["float32", "bfloat16", "float16"])
    add("max_new_tokens", type=int, default=NeedleRun.max_new_tokens)
    add("budget", type=int, default=RetrievalConfig().budget)
    add("window", type=int, default=MemoryConfig().n_window)
    add("sink", type=int, default=MemoryConfig().n_sink)
    add("chunk_size", type=int, default=LtriConfig().chunk_size)  # None: LtriConfig.prefill_chunk's default
    add("index_vectors", default=SpanConfig().index_vectors)
    add("query_dims", default=RetrievalConfig().query_dims)
    add("refresh_every", type=int, default=RetrievalConfig().refresh_every)
    add("vote", default=RetrievalConfig().vote, choices=VOTES)
    add("reading_vote", default=RetrievalConfig().reading_vote, choices=VOTES)
    add("reread", action=argparse.BooleanOptionalAction, default=RetrievalConfig().reread)
    add("reread_evidence", type=int, default=RetrievalConfig().reread_evidence)
    add("draft_tokens", type=int, default=RetrievalConfig().draft_tokens)
    add("echo_tokens", type=int, default=RetrievalConfig().echo_tokens)
    add("selector", default=RetrievalConfig().selector, choices=SELECTORS)
    add("select_tokens", type=int, default=RetrievalConfig().select_tokens)
    add("select_rank", type=int, default=RetrievalConfig().select_rank)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run no cell: write summary.csv and the heatmaps from the cells in --out (for example after "
        "merging the cells of several device calls)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> NeedleRun:
    command_line = parser()
    args = vars(command_line.parse_args(argv))
    args.pop("report_only")
    try:
        return make_run(**args)
    except (ValueError, LtriError) as error:
        command_line.error(str(error).rstrip("."))


def run_benchmark(run: NeedleRun, argv: Sequence[str], preloaded: tuple | None = None) -> list[dict]:
    """Run the grid's missing cells, then write config.json, summary.csv and the heatmaps; returns the
    summary rows. A directory holding cells of other settings raises LtriError before anything runs.
    preloaded: (model, tokenizer) to use instead of loading run.model."""
    earlier = previous_runs(run)
    model, tokenizer = preloaded or load_model(run.model, device=run.device, dtype=run.dtype)
    run.out.mkdir(parents=True, exist_ok=True)
    write_run_config(run, model, argv, earlier)
    run_cells(run, model, tokenizer)
    return write_report(run)


def write_report(run: NeedleRun) -> list[dict]:
    """summary.csv and the heatmaps from the cells in run.out, without running any; returns the summary rows."""
    cells = load_cells(run)
    if not cells:
        raise LtriError(f"{run.out} holds no cells of this grid to report on.")
    rows = report.summary_rows(run, cells)
    report.write_summary(run.out / "summary.csv", rows)
    report.plot_heatmaps(run, cells)
    report.print_table(rows)
    return rows


def main(argv: Sequence[str] | None = None, preloaded: tuple | None = None) -> list[dict]:
    """The script: parse argv (default: sys.argv[1:]) and run; returns the summary rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run = parse_args(argv)
    try:
        if "--report-only" in argv:
            return write_report(run)
        return run_benchmark(run, argv, preloaded)
    except LtriError as error:
        sys.exit(f"needle: {error}")
