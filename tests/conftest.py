import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
