"""benchmarks/speed/kernel_resources.py --limit 2: a kernel launch compiled for sm_90 on this machine, its registers
and spills read from ptxas (in a subprocess: Triton must not be in interpreter mode there)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import environment_without_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_two_launches_report_registers_and_spills():
    env = environment_without_interpreter()
    script = ROOT / "benchmarks" / "speed" / "kernel_resources.py"
    done = subprocess.run([sys.executable, str(script), "--limit", "2"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for row in rows:
        assert row["kernel"] in ("_split_kernel", "_merge_kernel") and row["dtype"] == "float32"
        assert row["constexprs"]["HEADDIM"] > 0
        assert 0 < row["registers"] <= 255 and row["spill_stores"] >= 0 and row["num_warps"] in (4, 8)
