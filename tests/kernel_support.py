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
