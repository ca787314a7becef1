"""Finding and refusing models, in one sentence each."""

import json

import pytest

from ltri import LtriError, load_model
from ltri.model import default_gguf_path


def test_the_bundled_gguf_is_found():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


def test_env_override_of_the_default_model_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("LTRI_DEFAULT_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(LtriError, match="LTRI_DEFAULT_GGUF"):
        default_gguf_path()


def test_non_llama_models_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LtriError, match="'gpt2' is not supported"):
        load_model(str(tmp_path))


def test_bundled_model_loads_float32_on_cpu_with_ltri_attention(smollm):
    model, tokenizer = smollm
    assert model.config._attn_implementation == "ltri"
    assert next(model.parameters()).dtype.is_floating_point
    assert str(next(model.parameters()).dtype) == "torch.float32"
    assert tokenizer.chat_template
