"""Every Triton kernel builds for an H100 (sm_90) on this machine, GPU or not: tests/kernel_build.py, which records
each launcher's launches on CPU tensors and compiles them with Triton's compiler and ptxas, in a subprocess (it
must not see Triton's interpreter, which the kernel tests switch on)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import environment_without_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_launch_builds_for_sm90():
    env = environment_without_interpreter()
    script = ROOT / "tests" / "kernel_build.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    built, total = (int(word) for word in done.stdout.split("built ")[1].split()[:3:2])
    assert built == total > 100  # every kernel, each dtype, several launch shapes
