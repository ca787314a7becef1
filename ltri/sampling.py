"""Choosing the next token from logits: greedy at temperature 0, else temperature + top-p."""

from __future__ import annotations

import torch

from ltri.config import SamplingConfig


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """logits: (vocab,) for the next position. Returns the chosen token id."""
    if config.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        probs = _top_p_filter(probs, config.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum()


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
