"""Triton kernels, imported as ltri.kernels; each file holds a kernel, its launcher and a torch reference.

    ltri.kernels.sparse_attention   sparse_attention, merge_partial
    ltri.kernels.lowrank_scores     pca_basis, project_keys, lowrank_scores (Loki)
    ltri.kernels.sparq_scores       sparq_scores, selected_mass, mean_value_reallocation (SparQ)
    ltri.kernels.topk_select        topk_tokens (one row's top k, ascending, without a sort), topk_found (with
                                    their scores, -1 where a score is -inf)
    ltri.kernels.selected_attention selected_attention (a decode step's attention over resident keys and selected
                                    stored tokens, read and rotated where they lie)
    ltri.kernels.pack_rotate        pack_rotate (a captured step's sinks, retrieved rows and window, keys rotated)
    ltri.kernels.vector_scores      vector_scores (the span index's scores of every vector)
    ltri.kernels.span_scores        span_scores (each span's best vector score, vectors kept together)
    ltri.kernels.span_max           span_max (the shared votes' read: each span's largest vote)
    ltri.kernels.settled_votes      settled_votes (a layer's span votes: pooled, shared, persisted, in three launches)
    ltri.kernels.budget_rows        budget_rows (the token budget filled from the best votes, the chosen spans' rows)
    ltri.kernels.cache_slots        refresh_slots (the row cache's slots after a decode step)
    ltri.kernels.cached_gather      cached_gather (candidates' rows gathered from the row cache or the stored rows)
    ltri.kernels.span_votes         span_votes (the heads' summed softmax over the spans' Quest upper bounds)
    ltri.kernels.chunk_attention_map  chunk_attention_map (a prefill chunk's causal attention map, group mean)
    ltri.kernels.disjoint_nms       disjoint_nms (segmentation's greedy NMS without overlap, all rounds at once)
    ltri.kernels.rms_norm           rms_norm (a decode step's RMS norm, with the residual add before it)
    ltri.kernels.silu_mul           silu_mul (the gated MLP's silu(gate) * up)

Import the functions from their modules (this package does not re-export them: the modules share their
names with their main function).

Importing this package never imports triton: each file binds triton when it first launches a kernel. The
public functions run the Triton kernel on CUDA tensors, or on any tensors when TRITON_INTERPRET=1 (Triton's
interpreter, how the tests check the kernels on a CPU); otherwise they run the torch reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import NamedTuple

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run in Triton's interpreter, on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the public functions launch a Triton kernel for these tensors (else the torch reference)."""
    if not triton_installed():
        return False
    return interpreting() or all(t.is_cuda for t in tensors)


class CachedRows(NamedTuple):
    """Device copies of some stored token rows (``ltri.offload.row_cache``), as a kernel that reads candidates' rows
    reads and refills them (``lowrank_scores``, ``cached_gather``).

    slots  (>= n_rows,) int32   each stored row's place in rows, -1 for none
    rows   (C, *row)            the copies, laid out as the stored rows
    out    (B, *row)            where each candidate's row, as read (from rows or the stored rows), is written at the
                                candidate's place: the cache's incoming rows
    """

    slots: torch.Tensor
    rows: torch.Tensor
    out: torch.Tensor

    def check(self, row: tuple[int, ...], n_cand: int, like: torch.Tensor, who: str, source: str) -> None:
        """ValueError in one sentence unless the cache fits rows of shape row, n_cand candidates, like's dtype and
        device (source names like in the message), contiguous copies and int32 slots."""
        shape = ", ".join(map(str, row))
        if self.rows.shape[1:] != tuple(row) or self.out.shape != (n_cand, *row):
            raise ValueError(f"{who} wants the cache's rows (C, {shape}) and out ({n_cand}, {shape}), got "
                             f"{tuple(self.rows.shape)} and {tuple(self.out.shape)}.")  # fmt: skip
        if self.slots.dim() != 1 or self.slots.dtype != torch.int32:
            raise ValueError(f"{who} wants the cache's slots (n,) int32, got {self.slots.dtype} "
                             f"{tuple(self.slots.shape)}.")  # fmt: skip
        if any(t.device != like.device for t in self) or {self.rows.dtype, self.out.dtype} != {like.dtype}:
            raise ValueError(f"{who} wants the cache on the {source}' device, in its dtype ({like.dtype}).")
        if not (self.rows.is_contiguous() and self.out.is_contiguous()):
            raise ValueError(f"{who} wants the cache's rows and out contiguous.")


def check_rows(rows: torch.Tensor, device: torch.device) -> None:
    """A scoring kernel's candidate rows: 1-D int32/int64 on the keys' device; bounds are not checked (that would
    wait for the device)."""
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64) or rows.device != device:
        raise ValueError(f"rows must be a 1-D int32/int64 tensor on the keys' device ({device}), "
                         f"got {rows.dtype} {tuple(rows.shape)} on {rows.device}.")  # fmt: skip


def load_triton_interpreter() -> None:
    """Import triton so that its interpreter can run the kernels on CPU tensors (tests, smoke runs).

    Triton decides when it is first imported whether its own library functions (tl.sum, tl.max...) are
    interpreted, so the first import must see TRITON_INTERPRET=1. The variable is restored afterwards: kernels
    run in the interpreter only while it is set. RuntimeError if triton is missing or was already imported
    for compiled kernels.
    """
    if "triton" in sys.modules:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(standard.sum, InterpretedFunction):
            raise RuntimeError("triton was imported without TRITON_INTERPRET=1, so its interpreter cannot run "
                               "kernels in this process: set TRITON_INTERPRET=1 before starting it.")  # fmt: skip
        return
    if not triton_installed():
        raise RuntimeError("triton is not installed.")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before


__all__ = ["interpreting", "use_triton", "triton_installed", "load_triton_interpreter", "check_rows"]
