"""Rotary positions chosen by mode, applied to pre-RoPE queries and keys with the model's own rotary module.

Vocabulary: keys (batch, nheads_kv, seqlen, headdim); positions are 1-D LongTensors of length seqlen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """How the resident keys are laid out in attention order: sinks, retrieved spans, then the window."""

    n_sink: int = 0
    n_retrieved: int = 0
    n_window: int = 0

    @property
    def n_resident(self) -> int:
        return self.n_sink + self.n_retrieved + self.n_window


def key_positions(mode: str, resident: torch.Tensor, chunk: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
    """Positions to rotate the resident keys and the chunk with: (n_resident + q_len,).

    resident: (n_resident,) positions of the resident tokens in the text, in attention order.
    chunk: (q_len,) positions of the current chunk in the text. The chunk's queries take the last
    q_len of the returned positions, as its keys do. layout: where the retrieved tokens are (None:
    none are retrieved, everything resident is sinks or window).

    ``true`` keeps the text positions; ``compact`` lays the resident tokens out at 0..n_resident-1 and
    the chunk right after them, so the largest distance seen is the number of resident tokens;
    ``one_angle`` (InfLLM) lays sinks, window and chunk out like ``compact`` but puts every retrieved
    token at the one position between the sinks and the window.
    """
    if mode == "true":
        return torch.cat([resident, chunk])
    n_keys = resident.numel() + chunk.numel()
    if mode == "compact":
        return torch.arange(n_keys, device=chunk.device)
    if mode == "one_angle":
        return one_angle_positions(layout or Layout(n_window=resident.numel()), n_keys, chunk.device)
    raise ValueError(f"unknown position mode {mode!r}")


def one_angle_positions(layout: Layout, n_keys: int, device) -> torch.Tensor:
    """Sinks at 0..n_sink-1, every retrieved token at n_sink, window and chunk contiguous after it."""
    positions = torch.arange(n_keys, device=device)
    if layout.n_retrieved == 0:
        return positions
    after = layout.n_sink + layout.n_retrieved
    positions[layout.n_sink : after] = layout.n_sink
    positions[after:] -= layout.n_retrieved - 1
    return positions


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
        # Dynamic variants rescale with the longest position asked for: their tables are not prefixes of longer ones.
        rope_type = str(getattr(rotary_module, "rope_type", "default"))
        self.prefixes_are_stable = "dynamic" not in rope_type and "longrope" not in rope_type
        self._prefix: RopeTable | None = None  # the table of positions 0..n-1, grown on demand

    def table(self, positions: torch.Tensor, like: torch.Tensor) -> RopeTable:
        """cos/sin for positions (seqlen,), in the dtype of like."""
        cos, sin = self.module(like, positions[None, :])
        return RopeTable(cos[:, None], sin[:, None])

    def prefix_table(self, n: int, like: torch.Tensor) -> RopeTable:
        """The table of positions 0..n-1: views of one table kept for the longest n so far (each position's
        cos/sin is computed alone, so a prefix of a longer table is the shorter table, bit for bit)."""
        if not self.prefixes_are_stable:
            return self.table(torch.arange(n, device=like.device), like)
        held = self._prefix
        if held is None or held.cos.shape[2] < n or held.cos.dtype != like.dtype or held.cos.device != like.device:
            longest = max(n, 2 * (0 if held is None else held.cos.shape[2]), 4096)
            self._prefix = held = self.table(torch.arange(longest, device=like.device), like)
        return RopeTable(held.cos[:, :, :n], held.sin[:, :, :n])

    def long_range_mask(self, reach: int, device) -> torch.Tensor | None:
        """(headdim,) 1.0 on the dimensions whose rotation over reach tokens stays under one radian, 0.0 on
        the others; None when the module has no inv_freq.

        Over long distances the fast-rotating pairs of a query and a key meet at pseudo-random angles,
        so the model's long-range attention is carried by the slow pairs; a retrieval score on the slow
        pairs alone estimates what the query will attend to from afar. Pairs are (j, j + headdim / 2).
        """
        inv_freq = getattr(self.module, "inv_freq", None)
        if inv_freq is None:
            return None
        slow = (inv_freq.float() * reach < 1.0).float()
        return torch.cat([slow, slow]).to(device)

    def unrotate_identity(self, x: torch.Tensor) -> torch.Tensor:
        """Undo what the model's forward did with position 0: x * attention_scaling (exact when 1)."""
        return x if self.scaling == 1.0 else x / self.scaling
