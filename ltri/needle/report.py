"""The run's report: summary.csv (one row per method and length), the printed table, and heatmaps of
accuracy and needle recall (depths by lengths, one panel per method; needs matplotlib)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from ltri.needle.settings import NeedleRun, format_depth

Cells = dict[tuple[str, int, float], dict]  # (method, length, depth) -> cell record


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_rows(run: NeedleRun, cells: Cells) -> list[dict]:
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


def plot_heatmaps(run: NeedleRun, cells: Cells) -> list[Path]:
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


def draw_panel(axis, run: NeedleRun, cells: Cells, method: str, key: str) -> None:
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
