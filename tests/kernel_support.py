"""What the kernel tests share: where they run and how, without CUDA, Triton's interpreter is switched on.

Without CUDA each kernel test module runs the Triton kernels in Triton's interpreter: conftest imports
triton in interpreter mode before anything else can, and the module fixture below sets TRITON_INTERPRET=1
while the module runs (the kernels' dispatch reads it), restoring the environment after. With CUDA the
kernels run compiled, bf16 included.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
ROWS_DTYPES = [torch.int64, torch.int32]  # candidates read in place: the rows' dtypes a scores kernel takes


def cases_with_rows(cases: list) -> list[tuple]:
    """(case, dtype, rows dtype or None) for a scores kernel that reads its candidates whole or through rows: every
    case in every dtype without rows, then each case once with rows, dtypes and rows' dtypes taken in turn (the
    interpreter is slow: CI's time)."""
    whole = [(case, dtype, None) for case in cases for dtype in DTYPES]
    through_rows = [(case, DTYPES[i % len(DTYPES)], ROWS_DTYPES[i % 2]) for i, case in enumerate(cases)]
    return whole + through_rows


def case_id(value) -> str:
    """A test id part: a case tuple as its numbers joined by '-', anything else as str."""
    return "-".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.fixture(autouse=True, scope="module")
def interpret_without_cuda():
    before = os.environ.get("TRITON_INTERPRET")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


def environment_without_interpreter() -> dict[str, str]:
    """This process's environment less TRITON_INTERPRET: for a subprocess that compiles kernels for the GPU."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
