"""The needle-in-a-haystack harness (ltri.needle, run by benchmarks/needle/needle.py and `ltri needle`) on the
bundled model, CPU, generated filler."""

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from ltri.cli import needle as needle_command
from typer.testing import CliRunner

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session
from ltri.chat_format import ChatFormat
from ltri.errors import LtriError
from ltri.filler import filler_text
from ltri.methods import METHODS, method_config
from ltri.needle import cell, command, grid, haystack, oracle, recall, run_config, settings, tasks
from ltri.needle.scoring import score
from ltri.retrieval import Persistence
from ltri.span_memory import SpanMemory

LENGTH = 1536
DEPTHS = (25.0, 60.0)  # both far enough from the end that a 256-token window has let the needle go


def test_depths_and_lengths_parse():
    assert settings.parse_depths("5") == (0.0, 25.0, 50.0, 75.0, 100.0)
    assert settings.parse_depths("10,50,90") == (10.0, 50.0, 90.0)
    assert settings.parse_depths("50%") == (50.0,)
    assert settings.parse_lengths("16k,1500") == (16384, 1500)


def test_score_is_a_string_match():
    assert score("Eat a Sandwich in DOLORES park.", tasks.ANSWER_TERMS) == 1.0
    assert score("a sandwich", tasks.ANSWER_TERMS) == 0.5
    assert score("no idea", tasks.ANSWER_TERMS) == 0.0


def test_passkey_is_five_digits_fixed_by_the_seed_and_the_cell():
    probe = tasks.make_probe("passkey", 0, 4096, 25.0)
    (key,) = probe.answer_terms
    assert len(key) == tasks.PASSKEY_DIGITS and key.isdigit() and key[0] != "0"
    assert probe.sentence == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert probe.question == "What is the pass key?"
    assert tasks.make_probe("passkey", 0, 4096, 25.0) == probe
    others = {
        tasks.make_probe("passkey", seed, length, depth).answer_terms
        for seed in (0, 1)
        for length in (4096, 8192)
        for depth in (0.0, 25.0, 50.0)
    }
    assert len(others) > 1
    assert probe.score(f"It is {key}.") == 1.0 and probe.score("It is a small coin.") == 0.0
    assert tasks.make_probe("needle", 3, 4096, 25.0) == tasks.Probe(tasks.NEEDLE, tasks.QUESTION, tasks.ANSWER_TERMS)


@pytest.mark.parametrize("depth", [0.0, 37.5, 100.0])
@pytest.mark.parametrize("task", tasks.TASKS)
def test_context_has_the_length_and_the_needle_where_the_session_feeds_it(smollm, depth, task):
    tokenizer = smollm[1]
    sentence = tasks.make_probe(task, 0, 1000, depth).sentence
    context = haystack.build_context(tokenizer, haystack.make_haystack(tokenizer, None, 2000), 1000, depth, sentence)
    assert abs(context.n_tokens - 1000) <= 2
    assert context.text[slice(*context.needle_chars)] == sentence
    assert abs(context.actual_depth_percent - depth) < 5
    ids, offsets = recall.fed_token_ids(tokenizer, ChatFormat.for_tokenizer(tokenizer), context.text)
    start, end = recall.needle_token_range(offsets, context.needle_chars)
    assert tokenizer.decode(ids[start:end]).strip() == sentence


def test_haystack_from_a_directory_is_its_text_files_repeated(smollm, tmp_path):
    tokenizer = smollm[1]
    (tmp_path / "b.txt").write_text(filler_text(20, seed=2))
    (tmp_path / "a.txt").write_text(filler_text(20, seed=1))
    (tmp_path / "notes.md").write_text("not part of the haystack")
    made = haystack.make_haystack(tokenizer, tmp_path, 3000)
    assert made.n_tokens >= 3000
    assert made.text.startswith(filler_text(20, seed=1))
    assert "not part" not in made.text


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
    coverage = recall.NeedleCoverage(start=10, end=22)  # spans 0 (4..12), 1 (12..20), 2 (20..30)
    assert coverage.resident_mask(memory).tolist() == [False] * 2 + [True] * 8 + [False] * 2
    memory.last_retrieved = torch.tensor([0, 1, 2])
    coverage.record(memory)
    memory.last_retrieved = torch.tensor([2, 3])
    coverage.record(memory)
    assert coverage.per_layer([memory]) == ([0.5], [pytest.approx((1 + 2 / 12) / 2)], [2])
    coverage = recall.NeedleCoverage(start=2, end=8)  # sinks (0..4) and span 0
    memory.last_retrieved = torch.tensor([0])
    assert coverage.resident_mask(memory).all()
    coverage = recall.NeedleCoverage(start=55, end=58)  # in the window: no retrieval needed
    memory.last_retrieved = torch.tensor([], dtype=torch.long)
    assert coverage.resident_mask(memory).all()


def test_watch_needle_restores_the_retrieval():
    original = SpanMemory._retrieve
    with pytest.raises(RuntimeError), recall.watch_needle(0, 1):
        assert SpanMemory._retrieve is not original
        raise RuntimeError
    assert SpanMemory._retrieve is original


def test_oracle_retrieval_puts_the_needle_in_every_layer_at_every_step(smollm):
    """ltri.needle.oracle: with a budget too small to hold the needle by chance (but two spans of up to 128 tokens),
    every retrieval of every layer holds it."""
    model, tokenizer = smollm
    probe = tasks.make_probe("needle", 0, LENGTH, 40.0)
    made = haystack.make_haystack(tokenizer, None, LENGTH + 256)
    context = haystack.build_context(tokenizer, made, LENGTH, 40.0, probe.sentence)
    config = LtriConfig(memory=MemoryConfig(n_window=256), retrieval=RetrievalConfig(budget=256))
    with Session(model, config, tokenizer=tokenizer) as session:
        session.feed(context.text)
        _, offsets = recall.fed_token_ids(tokenizer, session.chat_format, context.text)
        start, end = recall.needle_token_range(offsets, context.needle_chars)
        original = SpanMemory._retrieve
        with oracle.needle_first(start, end), recall.watch_needle(start, end) as coverage:
            session.ask(probe.question, max_new_tokens=4)
        assert SpanMemory._retrieve is original
        memories = session.cache.memories()
        assert all(type(memory.persistence) is Persistence for memory in memories)
        full, tokens, steps = coverage.per_layer(memories)
    assert min(steps) > 1 and full == [1.0] * len(memories)


def harness_args(out: Path, budget: int = 256) -> list[str]:
    depths = ",".join(f"{depth:g}" for depth in DEPTHS)
    return [
        *("--lengths", str(LENGTH), "--depths", depths, "--methods", "ltri,full", "--out", str(out)),
        *("--window", "256", "--budget", str(budget), "--max-new-tokens", "24"),
    ]


def test_harness_writes_cells_summary_and_resumes(smollm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = SpanMemory._retrieve
    rows = command.main(harness_args(out), preloaded=smollm)
    assert SpanMemory._retrieve is original  # the wrapper is gone
    assert (out / "config.json").exists() and (out / "summary.csv").exists()
    assert {(row["method"], row["cells"]) for row in rows} == {("ltri", 2), ("full", 2)}
    paths = sorted((out / "cells").glob("*.json"))
    assert [path.name for path in paths] == [
        f"{method}_{LENGTH}_{depth:g}.json" for method in ("full", "ltri") for depth in DEPTHS
    ]
    n_layers = smollm[0].config.num_hidden_layers
    for path in paths:
        record = json.loads(path.read_text())
        assert record["status"] == "ok" and record["score"] in (0.0, 0.5, 1.0), record
        assert abs(record["context_length"] - LENGTH) <= 2
        if record["method"] == "full":
            assert record["needle_recall"] is None and record["needle_span_retrieved"] is None
            continue
        assert record["stats"]["spans"] > 0
        assert len(record["needle_span_retrieved"]) == n_layers
        assert all(0 <= fraction <= 1 for fraction in record["needle_span_retrieved"])
        assert 0 <= record["needle_recall"] <= 1
        assert min(record["retrieval_steps"]) >= 2  # the question chunk and at least one decode step retrieved spans
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["budget"] == 256 and config["environment"]["torch"] == torch.__version__

    # Resuming: every cell is there, so none is computed again.
    mtimes = [path.stat().st_mtime_ns for path in paths]
    monkeypatch.setattr(cell, "run_cell", lambda *args: pytest.fail("a finished cell was computed again"))
    assert command.main(harness_args(out), preloaded=smollm) == rows
    assert [path.stat().st_mtime_ns for path in paths] == mtimes

    # Reporting only: the summary again from the cells, no model needed.
    (out / "summary.csv").unlink()
    assert command.main([*harness_args(out), "--report-only"]) == rows
    assert (out / "summary.csv").exists()

    # A resume that would measure differently is refused.
    with pytest.raises(SystemExit, match="budget"):
        command.main(harness_args(out, budget=512), preloaded=smollm)


def test_out_of_memory_is_recorded_not_raised(smollm, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

    monkeypatch.setattr(cell, "read_and_answer", out_of_memory)
    run = command.parse_args(["--lengths", "512", "--depths", "50%", "--methods", "full", "--out", "unused"])
    probe = tasks.make_probe(run.task, run.seed, 512, 50.0)
    made = haystack.make_haystack(smollm[1], None, 600)
    context = haystack.build_context(smollm[1], made, 512, 50.0, probe.sentence)
    record = cell.run_cell(*smollm, run, "full", context, probe)
    assert record["status"] == "oom" and record["score"] is None and record["response"] is None
    assert "out of memory" in record["error"]


def test_a_run_made_before_tasks_existed_resumes_as_the_needle_task(tmp_path):
    run = command.make_run("1k", "50%", "ltri", tmp_path)
    grid.write_json(
        tmp_path / "config.json",
        {"args": {key: value for key, value in run_config.run_args(run).items() if key not in ("task", "seed")}},
    )
    assert len(run_config.previous_runs(run)) == 1
    passkey = command.make_run("1k", "50%", "ltri", tmp_path, task="passkey")
    with pytest.raises(LtriError, match="task"):
        run_config.previous_runs(passkey)


def test_every_method_is_accepted_and_unknown_ones_are_refused(tmp_path):
    run = command.make_run("1k", "50%", ",".join(METHODS), tmp_path)
    assert run.methods == METHODS
    assert [run.ltri_config(method) for method in METHODS] == [method_config(m, run.base_config()) for m in METHODS]
    with pytest.raises(ValueError, match="unknown methods"):
        command.make_run("1k", "50%", "ltri,h2o", tmp_path)


def needle_app() -> typer.Typer:
    app = typer.Typer()
    needle_command.register(app)
    app.callback()(lambda: None)  # a group, as ltri's app is: the command keeps its name on the command line
    return app


def test_ltri_needle_runs_a_passkey_grid(smollm, tmp_path, monkeypatch):
    """`ltri needle` on a fresh typer app: two methods, one passkey cell, files as the script writes them."""
    monkeypatch.setattr(command, "load_model", lambda *args, **kwargs: smollm)
    out = tmp_path / "run"
    args = ["needle", "--lengths", str(LENGTH), "--depths", "50%", "--methods", "infllm,quest", "--task", "passkey"]
    args += ["--out", str(out), "--window", "256", "--budget", "256", "--max-new-tokens", "12"]
    result = CliRunner().invoke(needle_app(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "config.json").exists() and (out / "summary.csv").exists()
    assert json.loads((out / "config.json").read_text())["task"] == "passkey"
    (key,) = tasks.make_probe("passkey", 0, LENGTH, 50.0).answer_terms
    for method in ("infllm", "quest"):
        record = json.loads(grid.cell_path(out, method, LENGTH, 50.0).read_text())
        assert record["task"] == "passkey" and record["answer_terms"] == [key] and key in record["needle"]
        assert record["status"] == "ok" and record["score"] in (0.0, 1.0)
        assert record["config"] == asdict(
            method_config(
                method, command.make_run(str(LENGTH), "50%", method, out, window=256, budget=256).base_config()
            )
        ) | {"max_new_tokens": 12}
        assert 0 <= record["needle_recall"] <= 1 and record["stats"]["spans"] > 0
    header = (out / "summary.csv").read_text().splitlines()[0]
    assert header == "method,context_length,accuracy,needle_recall,cells,oom"


def test_ltri_needle_refuses_bad_options_in_one_sentence(tmp_path):
    result = CliRunner().invoke(needle_app(), ["needle", "--methods", "h2o", "--out", str(tmp_path)])
    assert isinstance(result.exception, LtriError) and "unknown methods" in str(result.exception)
    result = CliRunner().invoke(needle_app(), ["needle", "--haystack", str(tmp_path), "--out", str(tmp_path)])
    assert isinstance(result.exception, LtriError) and ".txt files" in str(result.exception)


def test_every_retrieval_option_reaches_the_ltri_config(tmp_path):
    from ltri.needle.command import make_run

    options = dict(budget=300, window=200, sink=8, query_dims="long_range", refresh_every=3, vote="max", reread=True)
    options |= dict(reading_vote="mean", reread_evidence=64, draft_tokens=12, echo_tokens=32)
    options |= dict(selector="loki", select_tokens=128, select_rank=8)
    run = make_run("1k", "2", "ltri", tmp_path, None, **options)
    config = run.ltri_config("ltri")
    assert (config.retrieval.budget, config.memory.n_window, config.memory.n_sink) == (300, 200, 8)
    retrieval = config.retrieval
    assert (retrieval.query_dims, retrieval.refresh_every, retrieval.vote) == ("long_range", 3, "max")
    assert retrieval.reread and retrieval.echo_tokens == 32
    assert (retrieval.reread_evidence, retrieval.draft_tokens) == (64, 12)
    assert retrieval.reading_vote == "mean"
    assert (retrieval.selector, retrieval.select_tokens, retrieval.select_rank) == ("loki", 128, 8)


def test_a_selector_that_would_keep_the_whole_budget_is_refused_in_one_sentence(tmp_path):
    result = CliRunner().invoke(
        needle_app(),
        ["needle", "--selector", "sparq", "--budget", "512", "--select-tokens", "512", "--out", str(tmp_path)],
    )
    assert isinstance(result.exception, LtriError)
    assert "--select-tokens (512) of the --budget (512)" in str(result.exception)
    assert not any(tmp_path.iterdir())  # nothing run, nothing written
