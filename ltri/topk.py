"""Top-k along the last dimension in two rounds, for few long rows.

torch's top-k gives each row one thread block: a decode step asks for the best spans of 32 query rows (Llama-3-8B's
GQA groups) and fills the budget from one row of votes, rows that grow with every stored span. Here a row longer
than one chunk is cut into chunks of CHUNK entries, each chunk gives its best k (one block per row and chunk), and
the best k of those (with the entries of a last partial chunk) are the row's. Same values as one top-k; ties may
come out in another order.

``first_k_places`` and ``topk_ties_to_first`` order ties too, by place: the same entries whatever the row's width or
its chunks, so that a captured decode step, which scores a padded table of span slots, finds the spans the eager step
finds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltri.kernels import use_triton
from ltri.kernels.topk_select import topk_tokens

CHUNK = 1024  # entries per first-round top-k
TIE_CHUNK = 4096  # entries per first-round program of first_k_places (the top-k kernel's register block)


def padded_width(n: int) -> int:
    """A row width that splits into whole chunks (n itself when one chunk holds it): producers that can write -inf
    past their entries at no cost (the span scores kernel) size their rows so, and chunked_topk concatenates no
    partial chunk."""
    return n if n <= CHUNK else -(-n // CHUNK) * CHUNK


def chunked_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(min(k, n), dim=-1) (sorted) for values (..., n), in two rounds when n is longer than a chunk and
    k shorter than one: the best k of each whole chunk, and every entry of the last partial chunk, compete in the
    second round."""
    n = values.shape[-1]
    if n <= CHUNK or k >= CHUNK:
        return values.topk(min(k, n), dim=-1)
    whole = n - n % CHUNK
    chunks = values[..., :whole].unflatten(-1, (whole // CHUNK, CHUNK))  # (..., n_chunks, CHUNK)
    best, places = chunks.topk(k, dim=-1, sorted=False)
    places = (places + torch.arange(0, whole, CHUNK, device=values.device)[:, None]).flatten(-2)
    tail = torch.arange(whole, n, device=values.device).expand(*values.shape[:-1], n - whole)
    candidates = torch.cat([best.flatten(-2), values[..., whole:]], dim=-1)
    top, which = candidates.topk(k, dim=-1)
    return top, torch.cat([places, tail], dim=-1).gather(-1, which)


def first_k_places(values: torch.Tensor, k: int) -> torch.Tensor:
    """The places of the min(k, n) largest of float values (..., n), ties going to the earlier place, in ascending
    order -> (..., min(k, n)) int64: the same places whatever the row's width past its last finite entry.

    ``kernels.topk_select`` on CUDA (one program a row, no sort); a row longer than TIE_CHUNK on the GPU is cut into
    chunks of TIE_CHUNK entries whose own first-k places compete in a second round, in place order, so ties still
    go to the earlier place. The torch reference (a stable sort) elsewhere."""
    *lead, n = values.shape
    k = min(k, n)
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=values.device)
    rows = values.reshape(-1, n)
    if not use_triton(rows) or n <= TIE_CHUNK or 4 * k > TIE_CHUNK:
        return topk_tokens(rows, k).view(*lead, k)
    n_chunks = -(-n // TIE_CHUNK)
    if n_chunks * TIE_CHUNK != n:  # -inf past the row's end: after every real entry, so never before one
        rows = F.pad(rows, (0, n_chunks * TIE_CHUNK - n), value=float("-inf"))
    local = topk_tokens(rows.view(-1, TIE_CHUNK), k).view(rows.shape[0], n_chunks, k)
    candidates = (local + torch.arange(0, n_chunks * TIE_CHUNK, TIE_CHUNK, device=rows.device)[:, None]).flatten(1)
    winners = topk_tokens(rows.gather(1, candidates), k)  # candidates ascend, so the earlier place wins a tie
    return candidates.gather(1, winners).clamp(max=n - 1).view(*lead, k)  # clamp: -inf padding only past n


def topk_ties_to_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values.topk(min(k, n)) for float values (..., n), ties going to the earlier place: (values, places), the
    values descending."""
    places = first_k_places(values, k)
    top = values.gather(-1, places)
    order = top.sort(dim=-1, descending=True, stable=True).indices  # places ascend: ties keep the earlier first
    return top.gather(-1, order), places.gather(-1, order)
