"""Needle recall: while the question is answered, which of the hidden sentence's tokens each layer
of the ltri policy held in its resident set (sinks, window, retrieved spans), step by step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ltri.span_memory import SpanMemory


def fed_token_ids(tokenizer, chat_format, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """What Session.feed(text) feeds into a new session, the way it tokenizes it: the opening of the
    first user turn, then the text (both while no token has been seen). Returns the ids and, for the
    ids of text, their character offsets in text (the opening's ids get (-1, -1))."""
    add_special = chat_format.add_special_tokens
    opening = chat_format.open_first_user
    opening_ids = tokenizer(opening, add_special_tokens=add_special)["input_ids"] if opening else []
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    offsets = [(-1, -1)] * len(opening_ids) + [tuple(offset) for offset in encoded["offset_mapping"]]
    return opening_ids + encoded["input_ids"], offsets


def needle_token_range(offsets: Sequence[tuple[int, int]], needle_chars: tuple[int, int]) -> tuple[int, int]:
    """[start, end) positions of the tokens that overlap the sentence's characters, in the fed token stream."""
    start, end = needle_chars
    inside = [i for i, (first, last) in enumerate(offsets) if last > start and first < end and last > first]
    return inside[0], inside[-1] + 1


@dataclass(frozen=True)
class NeedleCoverage:
    """Per layer, one entry per retrieval step: which needle tokens [start, end) were resident.

    A step's masks stay where the memory keeps its positions until the answer is done, so that
    recording adds no device synchronization to the decode steps it watches.
    """

    start: int
    end: int
    steps: dict[int, list[list[torch.Tensor]]] = field(default_factory=dict)  # layer -> per step: masks

    def mask_parts(self, memory: SpanMemory) -> list[torch.Tensor]:
        """Masks (end - start,) bool of needle tokens in the sinks, the window, and the spans retrieved last."""
        parts = []
        for positions in (memory.sinks.positions(), memory.window.positions()):
            parts.append(torch.isin(torch.arange(self.start, self.end, device=positions.device), positions))
        needle = torch.arange(self.start, self.end)
        chosen = memory.last_retrieved.cpu()
        starts = memory.span_starts[chosen]
        ends = starts + memory.span_lengths[chosen]
        parts.append(((needle[:, None] >= starts[None]) & (needle[:, None] < ends[None])).any(dim=1))
        return parts

    def resident_mask(self, memory: SpanMemory) -> torch.Tensor:
        """(end - start,) bool on the CPU: needle tokens resident for the memory's last step."""
        return combine(self.mask_parts(memory))

    def record(self, memory: SpanMemory) -> None:
        self.steps.setdefault(memory.layer, []).append(self.mask_parts(memory))

    def per_layer(self, memories: Sequence[SpanMemory]) -> tuple[list[float], list[float], list[int]]:
        """Per layer: fraction of steps with the whole needle resident, mean fraction of needle tokens
        resident, steps recorded. A layer that never retrieved (it stored no span) counts its state now."""
        full, tokens, steps = [], [], []
        for memory in memories:
            masks = [combine(parts) for parts in self.steps.get(memory.layer, [])]
            steps.append(len(masks))
            masks = masks or [self.resident_mask(memory)]
            full.append(sum(float(mask.all()) for mask in masks) / len(masks))
            tokens.append(sum(float(mask.float().mean()) for mask in masks) / len(masks))
        return full, tokens, steps


def combine(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise or of masks that may live on different devices, on the CPU."""
    combined = masks[0].cpu()
    for mask in masks[1:]:
        combined = combined | mask.cpu()
    return combined


@contextmanager
def watch_needle(start: int, end: int) -> Iterator[NeedleCoverage]:
    """While inside, every SpanMemory retrieval records whether the needle [start, end) is resident."""
    coverage = NeedleCoverage(start, end)
    original = SpanMemory._retrieve

    def retrieve_and_record(memory, queries):
        result = original(memory, queries)
        coverage.record(memory)
        return result

    SpanMemory._retrieve = retrieve_and_record
    try:
        yield coverage
    finally:
        SpanMemory._retrieve = original


def recall_fields(session, coverage: NeedleCoverage) -> dict:
    """The cell's recall fields: per layer and averaged for the ltri policy, None for the others."""
    if session.config.memory.policy != "ltri":
        return {
            "needle_span_retrieved": None,
            "needle_recall": None,
            "needle_token_coverage": None,
            "retrieval_steps": None,
        }
    full, tokens, steps = coverage.per_layer(session.cache.memories())
    return {
        "needle_span_retrieved": full,
        "needle_recall": sum(full) / len(full),
        "needle_token_coverage": tokens,
        "retrieval_steps": steps,
    }
