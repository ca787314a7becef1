"""Top-k along the last dimension in two rounds, for few long rows.

torch's top-k gives each row one thread block: a decode step asks for the best spans of 32 query rows (Llama-3-8B's
GQA groups) and fills the budget from one row of votes, rows that grow with every stored span. Here a row longer
than one chunk is cut into chunks of CHUNK entries, each chunk gives its best k (one block per row and chunk), and
the best k of those (with the entries of a last partial chunk) are the row's. Same values as one top-k; ties may
come out in another order.

``topk_ties_to_first`` orders ties too, by place: the same entries whatever the row's width or its chunks, so that
a captured decode step, which scores a padded table of span slots, finds the spans the eager step finds.
"""

from __future__ import annotations

import torch

CHUNK = 1024  # entries per first-round top-k


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


def topk_ties_to_first(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_topk(values, k) for float values (..., n), ties going to the earlier place: the k largest of the
    int64 keys (the float32 value's order-preserving int32 bits, then the place reversed), all distinct."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0: -0.0 equals 0.0 (and a new contiguous tensor)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: their magnitude bits reversed
    places = torch.arange(values.shape[-1], device=values.device)
    keys = ordered * (1 << 32) + ((1 << 32) - 1 - places)
    places = chunked_topk(keys, k)[1]
    return values.gather(-1, places), places
