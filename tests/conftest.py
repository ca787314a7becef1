import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Triton's interpreter (how the kernel tests run on a CPU) must be chosen at triton's first import,
    # before any other module imports it; kernels only use it while TRITON_INTERPRET=1 is set.
    from ltri.kernels import load_triton_interpreter

    load_triton_interpreter()


@pytest.fixture(scope="session", autouse=True)
def _ltri_cache_for_tests(tmp_path_factory):
    """Converted models and stores go to ``$LTRI_CACHE``; tests share one unless CI gave its own."""
    if "LTRI_CACHE" not in os.environ:
        os.environ["LTRI_CACHE"] = str(tmp_path_factory.mktemp("ltri-cache"))
    yield


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct, float32 on the CPU: (model, tokenizer)."""
    from ltri import load_model

    return load_model(None, device="cpu", dtype="float32")
