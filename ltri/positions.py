"""Rotary positions chosen by mode, applied to pre-RoPE queries and keys with the model's own rotary module.

Vocabulary: keys (batch, nheads_kv, seqlen, headdim); positions are 1-D LongTensors of length seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def key_positions(mode: str, resident: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """Positions to rotate the resident keys and the chunk with: (n_resident + q_len,).

    resident: (n_resident,) positions of the resident tokens in the text, in attention order.
    chunk: (q_len,) positions of the current chunk in the text. The chunk's queries take the last
    q_len of the returned positions, as its keys do.

    ``true`` keeps the text positions; ``compact`` lays the resident tokens out at 0..n_resident-1 and
    the chunk right after them, so the largest distance seen is the number of resident tokens.
    """
    if mode == "true":
        return torch.cat([resident, chunk])
    if mode == "compact":
        return torch.arange(resident.numel() + chunk.numel(), device=chunk.device)
    raise ValueError(f"unknown position mode {mode!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class RopeTable:
    """cos and sin for a run of positions, shaped to broadcast over (batch, nheads, seqlen, headdim)."""

    cos: torch.Tensor  # (batch, 1, seqlen, headdim)
    sin: torch.Tensor  # (batch, 1, seqlen, headdim)

    def tail(self, n: int) -> RopeTable:
        """The table of the last n positions."""
        return RopeTable(self.cos[:, :, -n:], self.sin[:, :, -n:])

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, nheads, seqlen, headdim) rotated to this table's positions."""
        return x * self.cos + rotate_half(x) * self.sin


class Rotary:
    """The model's rotary embedding, callable with explicit positions.

    rotary_module: the model's ``rotary_emb``; its forward(x, position_ids) -> (cos, sin) of shape
    (batch, seqlen, headdim) already includes any attention scaling of the RoPE variant.
    """

    def __init__(self, rotary_module: torch.nn.Module) -> None:
        self.module = rotary_module
        self.scaling = float(getattr(rotary_module, "attention_scaling", 1.0))

    def table(self, positions: torch.Tensor, like: torch.Tensor) -> RopeTable:
        """cos/sin for positions (seqlen,), in the dtype of like."""
        cos, sin = self.module(like, positions[None, :])
        return RopeTable(cos[:, None], sin[:, None])

    def unrotate_identity(self, x: torch.Tensor) -> torch.Tensor:
        """Undo what the model's forward did with position 0: x * attention_scaling (exact when 1)."""
        return x if self.scaling == 1.0 else x / self.scaling
