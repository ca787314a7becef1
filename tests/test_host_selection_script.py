"""benchmarks/speed/host_selection.py on the CPU (the kernels' torch references): every way of reading the
retrieved tokens for the selection chooses the same tokens, and the rows say what each reads; the timings
themselves are for the GPU machine."""

import json
from pathlib import Path

from support import load_script

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


def test_every_way_chooses_the_same_tokens_and_reads_its_bytes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SPEED))  # as when it runs as a script: it shares host_gather.py's helpers
    script = load_script("benchmarks/speed/host_selection.py", "host_selection_benchmark")
    out = tmp_path / "selection.json"
    args = ["--device", "cpu", "--tokens", "2048", "--layers", "3", "--host-layers", "2", "--budget", "256"]
    script.main([*args, "--select-tokens", "64", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["agreement"] == {"sparq": 1.0, "loki": 1.0}
    rows = {row["way"]: row for row in result["rows"]}
    assert list(rows) == ["sparq_gathered", "sparq_in_place", "loki_gathered", "loki_projected"]
    keys = 3 * 256 * 8 * 128 * 4  # layers x budget x KV heads x head dim x float32
    assert rows["sparq_gathered"]["bytes"] == rows["loki_gathered"]["bytes"] == keys
    assert rows["loki_projected"]["bytes"] == keys * 16 // 128  # rank 16 of head dim 128
    assert all(row["ms"] > 0 and row["floor_ms"] > 0 for row in rows.values())
