"""ltri's attention function, registered with transformers under the name ``ltri``.

ltri calls the model with position_ids of zero, so the rotary embedding is the identity and the
queries and keys that reach this function are the model's pre-RoPE ones (times the RoPE variant's
attention scaling, which is undone here). This function asks the layer's memory for its resident set,
rotates resident keys and chunk by the position mode, attends, and hands the chunk to the memory.

Shapes: query (batch, nheads, q_len, headdim); key, value (batch, nheads_kv, q_len, headdim).
Called without ltri's step context (for example by ``model.generate``) it falls back to sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ltri.positions import RopeTable, key_positions

if TYPE_CHECKING:
    from ltri.cache import LtriCache
    from ltri.positions import Rotary

ATTENTION_NAME = "ltri"
STEP_KWARG = "ltri_step"


@dataclass(frozen=True)
class StepContext:
    """What every layer needs to know about the forward in progress."""

    cache: LtriCache
    rotary: Rotary
    position_mode: str
    chunk_positions: torch.Tensor  # (q_len,) positions of the chunk's tokens in the text
    # In compact mode the RoPE table depends only on the number of keys: the layers share it.
    compact_tables: dict[int, RopeTable] = field(default_factory=dict, compare=False)

    def key_table(self, resident_positions: torch.Tensor, like: torch.Tensor) -> RopeTable:
        """RoPE table for the resident keys followed by the chunk: (n_resident + q_len) positions."""
        if self.position_mode != "compact":
            return self.rotary.table(key_positions(self.position_mode, resident_positions, self.chunk_positions), like)
        n_keys = resident_positions.numel() + self.chunk_positions.numel()
        if n_keys not in self.compact_tables:
            positions = key_positions("compact", resident_positions, self.chunk_positions)
            self.compact_tables[n_keys] = self.rotary.table(positions, like)
        return self.compact_tables[n_keys]


def ltri_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepContext | None = kwargs.get(STEP_KWARG)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    output = attend_with_memory(step, module.layer_idx, query, key, value, scaling)
    return output.transpose(1, 2).contiguous(), None


def attend_with_memory(step: StepContext, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
    """Attention of the chunk over the layer's resident set and itself; returns (batch, nheads, q_len, headdim)."""
    memory = step.cache.memory(layer_idx)
    query = step.rotary.unrotate_identity(query)
    key = step.rotary.unrotate_identity(key)
    resident = memory.resident(query)
    if resident is None:
        keys, values, resident_positions = key, value, step.chunk_positions[:0]
    else:
        keys = torch.cat([resident.keys, key], dim=2)
        values = torch.cat([resident.values, value], dim=2)
        resident_positions = resident.positions
    table = step.key_table(resident_positions, like=keys)
    output = causal_chunk_attention(
        table.tail(query.shape[2]).rotate(query),
        table.rotate(keys),
        values,
        n_resident=resident_positions.numel(),
        scaling=scaling,
    )
    memory.append(key, value, step.chunk_positions)
    return output


def causal_chunk_attention(query, keys, values, n_resident: int, scaling: float | None) -> torch.Tensor:
    """query (batch, nheads, q_len, headdim) attends to every resident key and causally within the chunk.

    keys, values: (batch, nheads_kv, n_resident + q_len, headdim); GQA groups share a KV head.
    """
    q_len = query.shape[2]
    mask = None
    if q_len > 1:
        n_keys = keys.shape[2]
        key_index = torch.arange(n_keys, device=query.device)
        query_index = torch.arange(q_len, device=query.device) + n_resident
        mask = key_index[None, :] <= query_index[:, None]  # (q_len, n_keys)
    enable_gqa = query.shape[1] != keys.shape[1]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)


def ltri_mask(*args, **kwargs):
    """ltri builds its own causal mask inside the attention function."""
    return None


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, ltri_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ltri_mask)
