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
from torch.nn.attention import SDPBackend, sdpa_kernel

from ltri.kernels.chunk_attention_map import chunk_attention_map
from ltri.kernels.sparse_attention import sparse_attention
from ltri.positions import Layout, RopeTable, key_positions

if TYPE_CHECKING:
    from ltri.cache import LtriCache
    from ltri.config import LtriConfig
    from ltri.positions import Rotary

ATTENTION_NAME = "ltri"
# Not cuDNN: it plans every new shape on the host (2 ms a call on an H200, benchmarks/speed/NOTES.md step 3),
# and each chunk's resident set has a new length.
CHUNK_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
STEP_KWARG = "ltri_step"


@dataclass(frozen=True)
class RetrievalFrame:
    """How a pre-RoPE query is turned before it scores stored spans (whose index vectors are pre-RoPE keys).

    mask: (headdim,) keeps only some dimensions (``query_dims="long_range"``); rotation: RoPE by
    ``score_distance`` tokens, so that q.k is the logit the query would give the key from that far
    (retrieved tokens sit about a window away), not from distance 0, where the fast-rotating pairs,
    which carry mostly positional attention, all line up.
    """

    mask: torch.Tensor | None = None
    rotation: RopeTable | None = None  # one position, broadcasting over (batch, nheads, q_len, headdim)

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            query = query * self.mask
        return query if self.rotation is None else self.rotation.rotate(query)

    @staticmethod
    def for_config(config: LtriConfig, rotary: Rotary, device, dtype) -> RetrievalFrame | None:
        retrieval = config.retrieval
        if config.memory.policy != "ltri" or (retrieval.query_dims == "all" and retrieval.score_distance == 0):
            return None
        mask = None
        if retrieval.query_dims == "long_range":
            mask = rotary.long_range_mask(config.memory.n_window, device)
        rotation = None
        if retrieval.score_distance:
            like = torch.empty(0, device=device, dtype=dtype)
            rotation = rotary.table(torch.tensor([retrieval.score_distance], device=device), like)
        return RetrievalFrame(mask, rotation)


@dataclass(frozen=True)
class StepContext:
    """What every layer needs to know about the forward in progress."""

    cache: LtriCache
    rotary: Rotary
    position_mode: str
    chunk_positions: torch.Tensor  # (q_len,) positions of the chunk's tokens in the text
    retrieval_frame: RetrievalFrame | None = None  # how queries are turned before they ask for spans; None: as is
    # In ``one_angle`` mode the RoPE table depends only on the layout: layers with the same one share it.
    shared_tables: dict[Layout, RopeTable] = field(default_factory=dict, compare=False)

    def key_table(self, resident_positions: torch.Tensor, layout: Layout, like: torch.Tensor) -> RopeTable:
        """RoPE table for the resident keys followed by the chunk: (n_resident + q_len) positions."""
        if self.position_mode == "true":
            return self.rotary.table(key_positions("true", resident_positions, self.chunk_positions), like)
        if self.position_mode == "compact":  # positions 0..n-1 whatever the layout
            return self.rotary.prefix_table(resident_positions.numel() + self.chunk_positions.numel(), like)
        if layout not in self.shared_tables:
            positions = key_positions(self.position_mode, resident_positions, self.chunk_positions, layout)
            self.shared_tables[layout] = self.rotary.table(positions, like)
        return self.shared_tables[layout]


def ltri_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepContext | None = kwargs.get(STEP_KWARG)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    query, key = step.rotary.unrotate_identity(query), step.rotary.unrotate_identity(key)
    output = attend_with_memory(step, module.layer_idx, query, key, value, scaling)
    return output.transpose(1, 2).contiguous(), None


def attend_with_memory(step: StepContext, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
    """Attention of the chunk over the layer's resident set and itself; returns (batch, nheads, q_len, headdim).

    query, key: pre-RoPE (what the projections gave, before any rotation)."""
    memory = step.cache.memory(layer_idx)
    resident = memory.resident(query if step.retrieval_frame is None else step.retrieval_frame(query))
    if resident is None:
        keys, values, resident_positions, layout = key, value, step.chunk_positions[:0], Layout()
    else:
        keys = torch.cat([*resident.key_parts, key], dim=2)
        values = torch.cat([*resident.value_parts, value], dim=2)
        resident_positions, layout = resident.positions, resident.layout
    table = step.key_table(resident_positions, layout, like=keys)
    rotated_query = table.tail(query.shape[2]).rotate(query)
    rotated_keys = table.rotate(keys)
    n_resident = resident_positions.numel()
    if query.shape[2] == 1:
        output = decode_attention(rotated_query, rotated_keys, values, scaling)
    else:
        output = causal_chunk_attention(rotated_query, rotated_keys, values, n_resident=n_resident, scaling=scaling)
    chunk_attention = None
    if memory.wants_chunk_attention(query.shape[2]):
        chunk_attention = chunk_self_attention(rotated_query, rotated_keys[:, :, n_resident:], scaling)
    memory.append(key, value, step.chunk_positions, chunk_attention=chunk_attention)
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
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # every backend but math and cuDNN wants as many KV heads as query heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    with sdpa_kernel(CHUNK_BACKENDS):
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)


def decode_attention(query, keys, values, scaling: float | None) -> torch.Tensor:
    """One query position over every key by the sparse attention kernel (Triton on CUDA, its torch reference
    elsewhere): query (1, nheads, 1, headdim), keys, values (1, nheads_kv, n_keys, headdim) -> like query."""
    output, _ = sparse_attention(query[0], keys[0], values[0], scale=scaling)
    return output[None]


def chunk_self_attention(query, chunk_keys, scaling: float | None) -> torch.Tensor:
    """The chunk's causal attention among its own tokens, averaged over each KV head's query heads.

    query (1, nheads, q_len, headdim) and chunk_keys (1, nheads_kv, q_len, headdim), rotated.
    Returns (nheads_kv, q_len, q_len) float32: row i is query i's softmax over keys j <= i of the chunk
    (renormalised within the chunk), zeros above the diagonal. Span segmentation reads it
    (``kernels/chunk_attention_map.py``: a Triton kernel on CUDA).
    """
    scale = scaling if scaling is not None else query.shape[3] ** -0.5
    return chunk_attention_map(query[0], chunk_keys[0], scale)


def ltri_mask(*args, **kwargs):
    """ltri builds its own causal mask inside the attention function."""
    return None


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, ltri_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ltri_mask)
