"""Fingerprints that tell whether a saved store was made by this model and tokenizer.

They ignore the dtype the model was loaded in (weights are hashed after rounding to bfloat16), so a
store is recognised whatever precision the model has now; the store's own dtype is checked apart.
"""

from __future__ import annotations

import hashlib
import json

import torch

_IGNORED_CONFIG_KEYS = ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "_attn_implementation")
_SAMPLED_VALUES = 65536


def model_fingerprint(model) -> str:
    """sha256 over the model's config and a sample of its embedding and last norm weights."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for weights in _sampled_weights(model):
        digest.update(weights.detach().flatten()[:_SAMPLED_VALUES].to("cpu", torch.bfloat16).view(torch.int16).numpy())
    return digest.hexdigest()


def _sampled_weights(model) -> list[torch.Tensor]:
    weights = [model.get_input_embeddings().weight]
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is not None and getattr(norm, "weight", None) is not None:
        weights.append(norm.weight)
    return weights


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's vocabulary and its chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256(json.dumps([vocab, template], ensure_ascii=False).encode()).hexdigest()
