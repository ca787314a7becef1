"""benchmarks/speed/e2e.py on a tiny Llama on the CPU: rows, stored spans, profile, resuming, oom rows."""

import json
from pathlib import Path

import pytest
import torch
from support import load_script

SPEED_FIELDS = ("prefill_tok_s", "prefill_s", "decode_tok_s", "decode_ms_per_token", "decode_ms_median")


@pytest.fixture(scope="module")
def e2e():
    return load_script("benchmarks/speed/e2e.py", "e2e_benchmark")


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--tiny",
        "--device", "cpu",
        "--contexts", "1k",
        "--decode-tokens", "4",
        "--full-chunk", "512",
        "--ltri-chunk", "256",
        "--ltri-window", "256",
        "--ltri-sink", "16",
        "--store-root", str(tmp_path / "stores"),
        "--out", str(tmp_path / "e2e.json"),
        "--no-warmup",
        *extra,
    ]  # fmt: skip


def test_tiny_run_writes_rows_stores_spans_profiles_and_resumes(e2e, tmp_path):
    e2e.main(tiny_args(tmp_path, "--profile", "--profile-steps", "2"))
    document = json.loads((tmp_path / "e2e.json").read_text())
    rows = {row["method"]: row for row in document["rows"]}
    assert set(rows) == {"full", "ltri"}
    for row in rows.values():
        assert row["status"] == "ok" and row["context_len"] == 1024 and row["decode_tokens"] == 4
        assert all(row[name] > 0 for name in SPEED_FIELDS)
        assert row["peak_gpu_gb"] is None  # CPU run
        assert row["decode_floor_ms"] > 0 and row["run"] == 0
        slices = row["prefill_slices"]  # one a progress line, an eighth of the context each, covering it
        assert [s["from"] for s in slices[1:]] == [s["to"] for s in slices[:-1]] and slices[-1]["to"] == 1024
        assert slices[0]["from"] == 0 and all(s["tok_s"] > 0 for s in slices)
    assert rows["full"]["resident_tokens"] == 1024 + 4
    ltri = rows["ltri"]
    assert ltri["spans"] > 0 and ltri["store_payload_gb"] > 0 and ltri["store_gb"] > 0
    assert ltri["decode_span_cache_hits"] + ltri["decode_span_cache_misses"] > 0  # decode retrieved spans
    assert not any((tmp_path / "stores").iterdir())  # the store is removed after its row
    profile = (tmp_path / ltri["profile_file"]).read_text()
    assert "ltri.retrieve" in profile and "cProfile" in profile
    (run,) = document["runs"]
    assert run["command"].startswith("python3 benchmarks/speed/e2e.py --tiny") and run["copy_gb_s"] > 0

    e2e.main(tiny_args(tmp_path))  # everything is there: nothing measured again
    assert json.loads((tmp_path / "e2e.json").read_text()) == document


def test_start_profile_times_each_chunk_of_a_fresh_session(e2e, tmp_path):
    e2e.main(tiny_args(tmp_path, "--only-methods", "ltri", "--profile-start", "512"))
    (row,) = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    text = (tmp_path / row["start_profile_file"]).read_text()
    halves = [line for line in text.splitlines() if line.startswith("==== tokens")]
    assert [line.split(":")[0] for line in halves] == ["==== tokens 0-512", "==== tokens 512-1024"]
    for line in halves:  # two chunks of 256 a half, each timed
        chunk_seconds = [float(x) for x in line.split("chunk seconds: ")[1].removesuffix(" ====").split(", ")]
        assert len(chunk_seconds) == 2 and all(x > 0 for x in chunk_seconds)
    assert text.count("cProfile, Python functions by own time") == 2 and "span_memory.py" in text
    assert not any((tmp_path / "stores").iterdir())  # the fresh Session's store is removed too
    with pytest.raises(SystemExit, match="half the shortest context"):
        e2e.parse_args(tiny_args(tmp_path, "--profile-start", "1k"))


def test_rows_cut_off_are_kept_and_other_settings_refused(e2e, tmp_path):
    settings = e2e.parse_args(tiny_args(tmp_path, "--contexts", "1k,2k"))
    document = e2e.new_document(settings)
    e2e.put_row(document, {"method": "full", "context_len": 1024, "status": "started", "tokens_done": 512})
    e2e.save_document(document, settings.out)
    loaded = e2e.load_document(settings)
    assert loaded["rows"][0]["status"] == "cut_off" and loaded["rows"][0]["tokens_done"] == 512
    assert e2e.pending_rows(loaded, settings) == [(1024, "ltri"), (2048, "full"), (2048, "ltri")]
    with pytest.raises(SystemExit, match="other settings"):
        e2e.load_document(e2e.parse_args(tiny_args(tmp_path, "--decode-tokens", "8")))


def test_out_of_memory_becomes_an_oom_row(e2e, tmp_path, monkeypatch):
    def runs_out(model, ids, settings, progress):
        progress.prefill(256, ids.numel())
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")

    monkeypatch.setitem(e2e.RUNNERS, "full", runs_out)
    settings = e2e.parse_args(tiny_args(tmp_path))
    row = e2e.measure_row(None, "full", 1024, settings, run_index=0, bandwidth=1.0)
    assert row["status"] == "oom" and row["failed_in"] == "prefill" and row["tokens_done"] == 256
    assert row["error"].startswith("CUDA out of memory")


def test_merge_takes_the_asked_rows_of_another_call_with_their_runs(e2e, tmp_path):
    settings = e2e.parse_args(tiny_args(tmp_path, "--contexts", "1k,2k"))
    ours, theirs = e2e.new_document(settings), e2e.new_document(settings)
    ours["runs"] = [{"command": "first call", "copy_gb_s": 1.0}]
    theirs["runs"] = [{"command": "second call", "copy_gb_s": 1.0}]
    for document, speed, run in ((ours, 1.0, 0), (theirs, 2.0, 0)):
        for context in (1024, 2048):
            e2e.put_row(document, {"method": "ltri", "context_len": context, "status": "ok", "x": speed, "run": run})
    e2e.save_document(ours, settings.out)
    e2e.save_document(theirs, tmp_path / "other.json")
    e2e.main(tiny_args(tmp_path, "--contexts", "2k", "--merge", str(tmp_path / "other.json")))
    merged = json.loads(settings.out.read_text())
    rows = {row["context_len"]: row for row in merged["rows"]}
    assert rows[1024]["x"] == 1.0 and rows[2048]["x"] == 2.0  # only the asked context was taken
    assert merged["runs"][rows[2048]["run"]]["command"] == "second call"
    assert merged["runs"][rows[1024]["run"]]["command"] == "first call"
    with pytest.raises(SystemExit, match="other settings"):
        e2e.main(
            tiny_args(tmp_path, "--decode-tokens", "8", "--out", str(tmp_path / "x.json"), "--merge", str(settings.out))
        )


def test_full_rows_merge_across_ltri_configs_and_ltri_rows_do_not(e2e, tmp_path):
    """Full attention does not read ltri's config: its rows join a results file made with another one."""
    theirs = e2e.new_document(e2e.parse_args(tiny_args(tmp_path, "--contexts", "1k", "--ltri-chunk", "128")))
    theirs["runs"] = [{"command": "other chunk", "copy_gb_s": 1.0}]
    for method in ("full", "ltri"):
        e2e.put_row(theirs, {"method": method, "context_len": 1024, "status": "ok", "run": 0})
    e2e.save_document(theirs, tmp_path / "other.json")
    e2e.main(tiny_args(tmp_path, "--contexts", "1k", "--only-methods", "full", "--merge", str(tmp_path / "other.json")))
    merged = json.loads((tmp_path / "e2e.json").read_text())
    assert [row["method"] for row in merged["rows"]] == ["full"]
    with pytest.raises(SystemExit, match="other settings"):
        e2e.main(tiny_args(tmp_path, "--contexts", "1k", "--merge", str(tmp_path / "other.json")))


@pytest.mark.parametrize(
    "extra, kept", [((), False), (("--ltri-host-payloads", "always"), True), (("--device", "cuda"), True)]
)
def test_the_store_needs_no_room_while_host_rows_hold_the_payloads(e2e, tmp_path, extra, kept):
    """A row is refused for want of store space only when the payloads would go to the store while reading."""
    settings = e2e.parse_args([*tiny_args(tmp_path), *extra])
    assert e2e.keeps_host_rows(settings) == kept


@pytest.mark.parametrize("selector", ["sparq", "loki"])
def test_a_token_selector_decodes_through_captured_steps(e2e, tmp_path, selector):
    """--ltri-selector: each KV head keeps --ltri-select-tokens of the --ltri-budget retrieved; the steps stay
    captured (host rows and the torch index: on the CPU the captured step's code runs eagerly) and the row says
    what it selected, and what its row caches found (the attended rows, and the candidates' keys or projections)."""
    selection = ("--ltri-selector", selector, "--ltri-budget", "200", "--ltri-select-tokens", "64")
    captured = ("--ltri-host-payloads", "always", "--ltri-backend", "torch")
    args = tiny_args(tmp_path, "--only-methods", "ltri", *captured, *selection)
    e2e.main(args)
    (row,) = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert row["status"] == "ok" and (row["selector"], row["budget"], row["select_tokens"]) == (selector, 200, 64)
    steps = row["decode_captured_steps"]
    assert steps["declined"] == 0 and steps["bound"] + steps["eager"] == 4
    found, read = row["decode_row_cache_hits"]
    assert 0 <= found <= read and read > 0
    found, read = row["decode_candidate_cache_hits"]
    assert 0 <= found <= read and read > 0


def test_slice_rates_turn_rates_since_the_start_into_each_stretch_s_own(e2e):
    marks = [(100, 1.0), (200, 3.0), (400, 4.0)]  # 100 tok/s, then 50, then 200
    assert e2e.slice_rates(marks) == [
        {"from": 0, "to": 100, "tok_s": 100.0},
        {"from": 100, "to": 200, "tok_s": 50.0},
        {"from": 200, "to": 400, "tok_s": 200.0},
    ]


def test_prefill_slices_reads_the_progress_lines_of_one_row(tmp_path):
    slices = load_script("benchmarks/speed/prefill_slices.py", "prefill_slices_benchmark")
    log = tmp_path / "run.log"
    log.write_text(
        "  ltri 16384: prefill 2048/16384 tokens, 400 tok/s\n"
        "  ltri 400: prefill 100/400 tokens, 100 tok/s\n"
        "  ltri 400: prefill 200/400 tokens, 67 tok/s\n"
        "ltri 400: ok in 3.0 s\n"
    )
    document = slices.main([str(log), "--label", "ltri 400", "--out", str(tmp_path / "slices.json")])
    (entry,) = document["logs"].values()
    assert [(s["from"], s["to"]) for s in entry["slices"]] == [(0, 100), (100, 200)]
    assert entry["slices"][0]["tok_s"] == 100 and abs(entry["slices"][1]["tok_s"] - 50) < 1
    assert (tmp_path / "slices.json").exists()
