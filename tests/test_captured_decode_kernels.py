"""Captured decode steps with every Triton kernel on their path (span scores, span max, sparse attention) run in
Triton's interpreter on the CPU: the kernels' real call sites, not only their own tests, against the eager steps.

On a GPU the kernels run compiled in tests/test_captured_decode.py's GPU test; this module is for machines without.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("with CUDA the kernels run compiled in test_captured_decode's GPU test", allow_module_level=True)

from captured_sessions import LOKI, TEXT, decode_after, session_for  # noqa: E402
from kernel_support import interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import use_triton  # noqa: E402


def decode_through_kernels(session, n_steps: int, monkeypatch) -> tuple[torch.Tensor, list]:
    """The text read with the kernels' torch references (the prefill's kernel call sites have their own tests, and
    the interpreter made this test take four minutes), then n_steps decode steps through the interpreted kernels."""
    with monkeypatch.context() as without_interpreter:
        without_interpreter.delenv("TRITON_INTERPRET")
        assert not use_triton(torch.zeros(1))
        logits = session.prefill(TEXT)
    assert use_triton(torch.zeros(1))  # the module runs the kernels in the interpreter
    return decode_after(session, logits, n_steps)


# with Loki: its scores, top-k and the row cache's slots per KV head on the kernels' path too
@pytest.mark.parametrize("retrieval, n_steps", [({}, 12), (LOKI, 6)], ids=["no_selector", "loki"])
def test_captured_steps_through_the_kernels_equal_eager_steps(monkeypatch, retrieval, n_steps):
    eager = session_for("never", **retrieval)
    captured = session_for("always", **retrieval)
    expected, expected_spans = decode_through_kernels(eager, n_steps, monkeypatch)
    got, got_spans = decode_through_kernels(captured, n_steps, monkeypatch)
    steps = captured._captured.steps
    assert steps["declined"] == 0 and steps["bound"] + steps["eager"] == n_steps
    assert all(layer.row_cache is not None for layer in captured._captured.layers)
    assert got_spans == expected_spans
    assert (got - expected).abs().max().item() < 1e-4
