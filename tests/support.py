"""Real, small building blocks for tests: a tiny random Llama with GQA, a byte-level tokenizer, benchmark scripts
loaded as modules."""

from __future__ import annotations

import importlib.util
import mmap
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<eos>"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus <eos>: every text round-trips, no training needed."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)


def tiny_llama(
    n_layers: int = 3,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    rope: dict | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama (float32, CPU, sdpa) small enough for exactness tests over long texts."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=n_heads * head_dim,
        intermediate_size=2 * n_heads * head_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=32768,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=256,
        pad_token_id=256,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def load_script(relative_path: str, module_name: str):
    """The repository's script at relative_path (e.g. benchmarks/speed/e2e.py) imported as module_name."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE
