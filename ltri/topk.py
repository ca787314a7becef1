"""Top-k along the last dimension with ties to the earlier place, for few long rows.

A decode step asks for the best spans of 32 query rows (Llama-3-8B's GQA groups) and fills the budget from one row
of votes, rows that grow with every stored span. ``first_k_places`` and ``topk_ties_to_first`` order ties by place:
the same entries whatever the row's width, so that a captured decode step, which scores a padded table of span
slots, finds the spans the eager step finds. On CUDA the top-k kernel (``kernels/topk_select.py``) chooses them, a
long row in two launches: each part of the row gives its best k (one program per row and part), and the best k of
those are the row's. (Until 2026-12-07 a row longer than 4096 entries went in two rounds of its own here, with a
padding copy and three gathers around the kernel's launches: five torch launches more, twice a layer in a decode
step; ``benchmarks/speed/NOTES.md`` step 39.)
"""

from __future__ import annotations

import torch

from ltri.kernels import use_triton
from ltri.kernels.topk_select import topk_found, topk_found_reference, topk_tokens, topk_tokens_reference

CHUNK = 1024  # the span scores kernel's rows are whole multiples of this past one chunk (padded_width)


def padded_width(n: int) -> int:
    """A row width that splits into whole chunks (n itself when one chunk holds it): producers that can write -inf
    past their entries at no cost (the span scores kernel) size their rows so."""
    return n if n <= CHUNK else -(-n // CHUNK) * CHUNK


def first_k_places(values: torch.Tensor, k: int) -> torch.Tensor:
    """The places of the min(k, n) largest of float values (..., n), ties going to the earlier place, in ascending
    order -> (..., min(k, n)) int64: the same places whatever the row's width past its last finite entry.

    On CUDA ``kernels.topk_select`` (one program a row, no sort; a row longer than one program's block in two
    launches, its parts' candidates then the row's, exact ties included); elsewhere its torch reference (a stable
    sort), also under TRITON_INTERPRET=1, where the interpreted kernel would slow every CPU decode step."""
    *lead, n = values.shape
    k = min(k, n)
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=values.device)
    rows = values.reshape(-1, n)
    if not (rows.is_cuda and use_triton(rows)):
        return topk_tokens_reference(rows, k).view(*lead, k)
    return topk_tokens(rows, k).view(*lead, k)


def first_k_found(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """first_k_places with the values there: (their values float32, the places, -1 where the value is -inf: nothing
    found) -> each (..., min(k, n)); on CUDA from the top-k kernel's own launches, no gather after them."""
    *lead, n = values.shape
    k = min(k, n)
    if k == 0:
        return values.new_empty(*lead, 0, dtype=torch.float32), values.new_empty(*lead, 0, dtype=torch.long)
    rows = values.reshape(-1, n)
    found = topk_found if rows.is_cuda and use_triton(rows) else topk_found_reference
    top, places = found(rows, k)
    return top.view(*lead, k), places.view(*lead, k)


def topk_ties_to_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(min(k, n)) for float values (..., n), ties going to the earlier place: (values, places), the
    values descending."""
    places = first_k_places(values, k)
    top = values.gather(-1, places)
    order = top.sort(dim=-1, descending=True, stable=True).indices  # places ascend: ties keep the earlier first
    return top.gather(-1, order), places.gather(-1, order)
