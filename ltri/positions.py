"""Rotary positions chosen by mode, applied to pre-RoPE queries and keys with the model's own rotary module.

Vocabulary: keys (batch, nheads_kv, seqlen, headdim); positions are 1-D LongTensors of length seqlen.
"""

from __future__ import annotations

import torch


def assign_positions(mode: str, resident: torch.Tensor, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions to rotate the resident keys and the chunk with.

    resident: (n_resident,) positions of the resident tokens in the text, in attention order.
    chunk: (q_len,) positions of the current chunk in the text.
    Returns (key_positions (n_resident + q_len,), query_positions (q_len,)).

    ``true`` keeps the text positions; ``compact`` lays the resident tokens out at 0..n_resident-1 and
    the chunk right after them, so the largest distance seen is the number of resident tokens.
    """
    if mode == "true":
        query_positions = chunk
        key_positions = torch.cat([resident, chunk])
    elif mode == "compact":
        n_keys = resident.numel() + chunk.numel()
        key_positions = torch.arange(n_keys, device=chunk.device)
        query_positions = key_positions[resident.numel() :]
    else:
        raise ValueError(f"unknown position mode {mode!r}")
    return key_positions, query_positions


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """The model's rotary embedding, callable with explicit positions.

    rotary_module: the model's ``rotary_emb``; its forward(x, position_ids) -> (cos, sin) of shape
    (batch, seqlen, headdim) already includes any attention scaling of the RoPE variant.
    """

    def __init__(self, rotary_module: torch.nn.Module) -> None:
        self.module = rotary_module
        self.scaling = float(getattr(rotary_module, "attention_scaling", 1.0))

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (batch, nheads, seqlen, headdim) to positions (seqlen,)."""
        cos, sin = self.module(x, positions[None, :])
        cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seqlen, headdim)
        return x * cos + rotate_half(x) * sin

    def unrotate_identity(self, x: torch.Tensor) -> torch.Tensor:
        """Undo what the model's forward did with position 0: x * attention_scaling (exact when 1)."""
        return x if self.scaling == 1.0 else x / self.scaling
