"""The single-cell needle diagnostics (benchmarks/needle/answer_settings.py, resident_text.py) on the bundled
model, CPU, generated filler: they run end to end and write what their docstrings promise."""

import json
import runpy
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "needle"
CELL = ["--length", "1536", "--depth", "40", "--device", "cpu", "--max-new-tokens", "8"]


def run_script(name: str, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def test_answer_settings_asks_one_stored_context_with_each_setting_and_the_oracle(monkeypatch, tmp_path):
    out = tmp_path / "settings.json"
    run_script("answer_settings.py", monkeypatch, *CELL, "--settings", '[{}, {"oracle": true}]', "--out", str(out))
    result = json.loads(out.read_text())
    assert [row["setting"] for row in result["rows"]] == [{}, {"oracle": True}]
    oracle = result["rows"][1]
    assert oracle["needle_recall"] == 1.0 and all(steps > 0 for steps in oracle["retrieval_steps"])
    assert result["context_length"] == 1536 and result["feed_seconds"] > 0


def test_resident_text_asks_ltri_and_full_attention_over_what_ltri_holds(monkeypatch, tmp_path):
    out = tmp_path / "resident.json"
    run_script("resident_text.py", monkeypatch, *CELL, "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["answers"]) == {"ltri_oracle", "full_resident_text", "full_without_needle"}
    assert all(set(answer) == {"response", "score"} for answer in result["answers"].values())
    pieces = result["piece_tokens"]
    assert pieces["needle"] > 0 and pieces["window"] > 0 and pieces["sinks"] > 0
    assert "Dolores Park" in result["needle_piece"]
