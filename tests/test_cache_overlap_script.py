"""benchmarks/speed/cache_overlap.py with the bundled model on filler text: for each selector, the share of each
decode step's rows that its layer's row caches held, counted over the steps after the first."""

import json

from support import load_script


def test_each_selector_reports_the_rows_its_caches_found(tmp_path):
    script = load_script("benchmarks/speed/cache_overlap.py", "cache_overlap_benchmark")
    out = tmp_path / "overlap.json"
    args = ["--lengths", "1500", "--selectors", "none,loki", "--budget", "256", "--select-tokens", "64"]
    script.main([*args, "--decode-tokens", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["environment"]["text"] == "ltri.filler"
    plain, loki = result["rows"]
    for row in (plain, loki):
        assert row["context_len"] == 1500 and row["captured_steps"]["declined"] == 0
        assert row["captured_steps"]["bound"] + row["captured_steps"]["eager"] == 3
        (found_first, read_first), (found, read) = row["row_cache_counts"]
        assert found_first == 0 and read_first > 0  # the first step's caches start empty
        assert row["row_cache_found"] == (found - found_first) / (read - read_first)
        assert 0 < row["row_cache_found"] <= 1 and len(row["row_cache_found_by_step"]) == 2
    assert plain["candidate_cache_found"] is None and plain["candidate_cache_counts"] == [None, None]
    (_, read_first), (_, read) = loki["row_cache_counts"]
    assert read_first == read // 3 == 30 * 3 * 64  # each step: 30 layers x 3 KV heads x the 64 tokens each keeps
    assert 0 < loki["candidate_cache_found"] <= 1


def test_a_question_is_answered_as_chat_answers_it_and_its_steps_counted(tmp_path):
    script = load_script("benchmarks/speed/cache_overlap.py", "cache_overlap_benchmark")
    out = tmp_path / "overlap.json"
    args = ["--lengths", "1500", "--selectors", "sparq", "--budget", "256", "--select-tokens", "64"]
    script.main([*args, "--decode-tokens", "4", "--question", "Who walked to the harbour?", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["question"] == "Who walked to the harbour?" and row["captured_steps"]["declined"] == 0
    (found_first, read_first), (found, read) = row["row_cache_counts"]
    assert read > read_first > 0 and found_first <= found  # counted from the answer's first piece
    assert row["row_cache_found"] == (found - found_first) / (read - read_first)
    assert 0 <= row["candidate_cache_found"] <= 1
