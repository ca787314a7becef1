"""Top-k along the last dimension with ties to the earlier place, for few long rows.

A decode step asks for the best spans of 32 query rows (Llama-3-8B's GQA groups) and fills the budget from one row
of votes, rows that grow with every stored span. ``first_k_places`` and ``topk_ties_to_first`` order ties by place:
the same entries whatever the row's width, so that a captured decode step, which scores a padded table of span
slots, finds the spans the eager step finds. On CUDA the top-k kernel (``kernels/topk_select.py``) chooses them, a
row longer than TIE_CHUNK in two rounds: each chunk of the row gives its best k (one program per row and chunk),
and the best k of those are the row's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltri.kernels import use_triton
from ltri.kernels.topk_select import topk_tokens, topk_tokens_reference

CHUNK = 1024  # the span scores kernel's rows are whole multiples of this past one chunk (padded_width)
TIE_CHUNK = 4096  # entries per first-round program of first_k_places (the top-k kernel's register block)


def padded_width(n: int) -> int:
    """A row width that splits into whole chunks (n itself when one chunk holds it): producers that can write -inf
    past their entries at no cost (the span scores kernel) size their rows so."""
    return n if n <= CHUNK else -(-n // CHUNK) * CHUNK


def first_k_places(values: torch.Tensor, k: int) -> torch.Tensor:
    """The places of the min(k, n) largest of float values (..., n), ties going to the earlier place, in ascending
    order -> (..., min(k, n)) int64: the same places whatever the row's width past its last finite entry.

    On CUDA ``kernels.topk_select`` (one program a row, no sort), rows longer than TIE_CHUNK in two rounds
    (places_in_rounds); elsewhere its torch reference (a stable sort), also under TRITON_INTERPRET=1, where the
    interpreted kernel would slow every CPU decode step."""
    *lead, n = values.shape
    k = min(k, n)
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=values.device)
    rows = values.reshape(-1, n)
    if not (rows.is_cuda and use_triton(rows)):
        return topk_tokens_reference(rows, k).view(*lead, k)
    return places_in_rounds(rows, k, topk_tokens).view(*lead, k)


def places_in_rounds(rows: torch.Tensor, k: int, select) -> torch.Tensor:
    """first_k_places of rows (n_rows, n) by select(scores (r, m), k) -> (r, k) ascending places, ties to the earlier
    (the top-k kernel): one round when a row fits TIE_CHUNK or k is large, else each chunk of TIE_CHUNK entries
    gives its k best and the best k of those candidates, taken in place order so that ties still go to the earlier
    place, are the row's."""
    n = rows.shape[1]
    if n <= TIE_CHUNK or 4 * k > TIE_CHUNK:
        return select(rows, k)
    n_chunks = -(-n // TIE_CHUNK)
    if n_chunks * TIE_CHUNK != n:  # -inf past the row's end: after every real entry, so never before one
        rows = F.pad(rows, (0, n_chunks * TIE_CHUNK - n), value=float("-inf"))
    local = select(rows.reshape(-1, TIE_CHUNK), k).view(rows.shape[0], n_chunks, k)
    candidates = (local + torch.arange(0, n_chunks * TIE_CHUNK, TIE_CHUNK, device=rows.device)[:, None]).flatten(1)
    winners = select(rows.gather(1, candidates), k)  # candidates ascend, so the earlier place wins a tie
    return candidates.gather(1, winners).clamp(max=n - 1)  # clamp: -inf padding only past n


def topk_ties_to_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(min(k, n)) for float values (..., n), ties going to the earlier place: (values, places), the
    values descending."""
    places = first_k_places(values, k)
    top = values.gather(-1, places)
    order = top.sort(dim=-1, descending=True, stable=True).indices  # places ascend: ties keep the earlier first
    return top.gather(-1, order), places.gather(-1, order)
