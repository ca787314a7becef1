"""The needle-in-a-haystack harness (benchmarks/needle/needle.py) on the bundled model, CPU, generated filler."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ltri.chat_format import ChatFormat
from ltri.filler import filler_text
from ltri.span_memory import SpanMemory

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "needle" / "needle.py"
LENGTH = 1536
DEPTHS = (25.0, 60.0)  # both far enough from the end that a 256-token window has let the needle go


def load_harness():
    spec = importlib.util.spec_from_file_location("needle_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


needle = load_harness()


def test_depths_and_lengths_parse():
    assert needle.parse_depths("5") == (0.0, 25.0, 50.0, 75.0, 100.0)
    assert needle.parse_depths("10,50,90") == (10.0, 50.0, 90.0)
    assert needle.parse_depths("50%") == (50.0,)
    assert needle.parse_lengths("16k,1500") == (16384, 1500)


def test_score_is_a_string_match():
    assert needle.score("Eat a Sandwich in DOLORES park.") == 1.0
    assert needle.score("a sandwich") == 0.5
    assert needle.score("no idea") == 0.0


@pytest.mark.parametrize("depth", [0.0, 37.5, 100.0])
def test_context_has_the_length_and_the_needle_where_the_session_feeds_it(smollm, depth):
    tokenizer = smollm[1]
    haystack = needle.make_haystack(tokenizer, None, 2000)
    context = needle.build_context(tokenizer, haystack, 1000, depth)
    assert abs(context.n_tokens - 1000) <= 2
    assert context.text[slice(*context.needle_chars)] == needle.NEEDLE
    assert abs(context.actual_depth_percent - depth) < 5
    ids, offsets = needle.fed_token_ids(tokenizer, ChatFormat.for_tokenizer(tokenizer), context.text)
    start, end = needle.needle_token_range(offsets, context.needle_chars)
    assert tokenizer.decode(ids[start:end]).strip() == needle.NEEDLE


def test_haystack_from_a_directory_is_its_text_files_repeated(smollm, tmp_path):
    tokenizer = smollm[1]
    (tmp_path / "b.txt").write_text(filler_text(20, seed=2))
    (tmp_path / "a.txt").write_text(filler_text(20, seed=1))
    (tmp_path / "notes.md").write_text("not part of the haystack")
    haystack = needle.make_haystack(tokenizer, tmp_path, 3000)
    assert haystack.n_tokens >= 3000
    assert haystack.text.startswith(filler_text(20, seed=1))
    assert "not part" not in haystack.text


def test_coverage_counts_sinks_window_and_retrieved_spans():
    def positions(*ranges):
        return SimpleNamespace(positions=lambda: torch.cat([torch.arange(*r) for r in ranges]))

    memory = SimpleNamespace(
        layer=0,
        sinks=positions((0, 4)),
        window=positions((50, 60)),
        span_starts=torch.tensor([4, 12, 20, 30]),
        span_lengths=torch.tensor([8, 8, 10, 20]),
        last_retrieved=torch.tensor([1]),
    )
    coverage = needle.NeedleCoverage(start=10, end=22)  # spans 0 (4..12), 1 (12..20), 2 (20..30)
    assert coverage.resident_mask(memory).tolist() == [False] * 2 + [True] * 8 + [False] * 2
    memory.last_retrieved = torch.tensor([0, 1, 2])
    coverage.record(memory)
    memory.last_retrieved = torch.tensor([2, 3])
    coverage.record(memory)
    assert coverage.per_layer([memory]) == ([0.5], [pytest.approx((1 + 2 / 12) / 2)], [2])
    coverage = needle.NeedleCoverage(start=2, end=8)  # sinks (0..4) and span 0
    memory.last_retrieved = torch.tensor([0])
    assert coverage.resident_mask(memory).all()
    coverage = needle.NeedleCoverage(start=55, end=58)  # in the window: no retrieval needed
    memory.last_retrieved = torch.tensor([], dtype=torch.long)
    assert coverage.resident_mask(memory).all()


def test_watch_needle_restores_the_retrieval():
    original = SpanMemory._retrieve
    with pytest.raises(RuntimeError), needle.watch_needle(0, 1):
        assert SpanMemory._retrieve is not original
        raise RuntimeError
    assert SpanMemory._retrieve is original


def harness_args(out: Path, budget: int = 256) -> list[str]:
    depths = ",".join(f"{depth:g}" for depth in DEPTHS)
    return [
        *("--lengths", str(LENGTH), "--depths", depths, "--methods", "ltri,full", "--out", str(out)),
        *("--window", "256", "--budget", str(budget), "--max-new-tokens", "24"),
    ]


def test_harness_writes_cells_summary_and_resumes(smollm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = SpanMemory._retrieve
    rows = needle.main(harness_args(out), preloaded=smollm)
    assert SpanMemory._retrieve is original  # the wrapper is gone
    assert (out / "config.json").exists() and (out / "summary.csv").exists()
    assert {(row["method"], row["cells"]) for row in rows} == {("ltri", 2), ("full", 2)}
    paths = sorted((out / "cells").glob("*.json"))
    assert [path.name for path in paths] == [
        f"{method}_{LENGTH}_{depth:g}.json" for method in ("full", "ltri") for depth in DEPTHS
    ]
    n_layers = smollm[0].config.num_hidden_layers
    for path in paths:
        cell = json.loads(path.read_text())
        assert cell["status"] == "ok" and cell["score"] in (0.0, 0.5, 1.0), cell
        assert abs(cell["context_length"] - LENGTH) <= 2
        if cell["method"] == "full":
            assert cell["needle_recall"] is None and cell["needle_span_retrieved"] is None
            continue
        assert cell["stats"]["spans"] > 0
        assert len(cell["needle_span_retrieved"]) == n_layers
        assert all(0 <= fraction <= 1 for fraction in cell["needle_span_retrieved"])
        assert 0 <= cell["needle_recall"] <= 1
        assert min(cell["retrieval_steps"]) >= 2  # the question chunk and at least one decode step retrieved spans
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["budget"] == 256 and config["environment"]["torch"] == torch.__version__

    # Resuming: every cell is there, so none is computed again.
    mtimes = [path.stat().st_mtime_ns for path in paths]
    monkeypatch.setattr(needle, "run_cell", lambda *args: pytest.fail("a finished cell was computed again"))
    assert needle.main(harness_args(out), preloaded=smollm) == rows
    assert [path.stat().st_mtime_ns for path in paths] == mtimes

    # A resume that would measure differently is refused.
    with pytest.raises(SystemExit, match="budget"):
        needle.main(harness_args(out, budget=512), preloaded=smollm)


def test_out_of_memory_is_recorded_not_raised(smollm, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

    monkeypatch.setattr(needle, "read_and_answer", out_of_memory)
    run = needle.parse_args(["--lengths", "512", "--depths", "50%", "--methods", "full", "--out", "unused"])
    context = needle.build_context(smollm[1], needle.make_haystack(smollm[1], None, 600), 512, 50.0)
    cell = needle.run_cell(*smollm, run, "full", context)
    assert cell["status"] == "oom" and cell["score"] is None and cell["response"] is None
    assert "out of memory" in cell["error"]
