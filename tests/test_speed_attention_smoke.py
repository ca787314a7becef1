"""benchmarks/speed/attention.py --smoke: the whole script on the CPU (torch references, small sizes) writes the
rows, stages and packing comparison the GPU run writes, and its kernel checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"votes", "span_topk", "span_topk_torch", "candidate_rows", "token_scores", "token_topk", "token_topk_torch",
          "attention"}  # fmt: skip
UNFUSED_STAGES = {"votes", "span_topk", "gather", "token_scores", "token_topk", "place", "rotate_query", "attention"}


def test_smoke_run_writes_every_method_and_stage(tmp_path):
    out = tmp_path / "attention.json"
    script = ROOT / "benchmarks" / "speed" / "attention.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all(abs(value) < 1e-4 for value in result["checks"].values()), result["checks"]
    methods = {(row["context_len"], row["method"]) for row in result["rows"]}
    contexts = {context for context, _ in methods}
    assert len(contexts) == 2
    for context in contexts:
        expected = {"sdpa_full", "ltri", "ltri_loki", "ltri_unfused", "sparse_attention_kernel", "copy_same_bytes",
                    "selected_attention"}  # fmt: skip
        assert {m for c, m in methods if c == context} == expected
    for row in result["rows"]:
        assert row["ms"] > 0 and row["bytes"] > 0 and row["layers_ms"] is None  # per layer in a graph: GPU only
        if row["method"].startswith("ltri"):
            stages = UNFUSED_STAGES if row["method"] == "ltri_unfused" else STAGES
            assert set(row["stages_ms"]) == stages and all(ms > 0 for ms in row["stages_ms"].values())
    assert [row["method"] for row in result["pack_rotate"]] == ["pack_rotate_kernel", "pack_rotate_torch"]
    assert [row["method"] for row in result["chunk_attention_map"]] == ["chunk_map_kernel", "chunk_map_torch"]
    assert all(row["ms"] > 0 and row["context_len"] == 256 for row in result["chunk_attention_map"])
    selections = ("span_topk_128k", "span_topk_512k", "token_topk", "sparq_components")
    expected_topk = [f"{name}:{method}" for name in selections for method in ("topk_kernel", "topk_torch")]
    assert [row["method"] for row in result["topk"]] == expected_topk
    assert all(row["ms"] > 0 and row["matches_reference"] for row in result["topk"])
