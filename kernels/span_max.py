"""Each span's largest value over its run of positions, of the sum of two per-position buffers, at least 0.

    a, b        (n_positions,) float32   per-position values (the shared votes of the last step and this one)
    first       int                      the position of row 0
    first_rows  (n_spans,) int64         each span's first row; span s covers rows first_rows[s] onwards
    lengths     (n_spans,) int64         each span's rows, 0..max_len (0: the span reads 0)
    out         (n_spans,) float32       max(0, max over the span's positions p of a[p] + b[p])

The torch reference gathers a padded (n_spans, max_len) block and reduces its rows (no atomics). Spans are
much shorter than max_len on average: 1,096,005 spans over 32 layers at 512K tokens, about 15 tokens a span
against max_len 128 (benchmarks/speed/results/e2e_h100x2_host256gb_chunk2048.json), so that block is mostly
padding, gathered twice per layer and decode step. The kernel loads only each span's own positions (masked
lanes read nothing) and writes one value per span.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_S = 64  # spans per program
_BLOCK_P = 16  # positions per span per loop step


def _span_max_kernel(
    a_ptr, b_ptr, first_rows_ptr, lengths_ptr, out_ptr, first, n_spans, n_positions,
    MAX_LEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """BLOCK_S spans: each one's maximum over its positions, BLOCK_P positions a step."""
    spans = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    span_ok = spans < n_spans
    starts = first + tl.load(first_rows_ptr + spans, mask=span_ok, other=0)
    lengths = tl.load(lengths_ptr + spans, mask=span_ok, other=0)
    best = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for offset in range(0, MAX_LEN, BLOCK_P):
        steps = offset + tl.arange(0, BLOCK_P)
        positions = starts[:, None] + steps[None, :]  # (BLOCK_S, BLOCK_P)
        inside = (steps[None, :] < lengths[:, None]) & (positions < n_positions)
        values = tl.load(a_ptr + positions, mask=inside, other=0.0) + tl.load(b_ptr + positions, mask=inside, other=0.0)
        best = tl.maximum(best, tl.max(values, axis=1))
    tl.store(out_ptr + spans, best, mask=span_ok)


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    # counts that change as spans are stored: no specialisation (a recompile each time one changes class)
    return triton.jit(_span_max_kernel, do_not_specialize=["first", "n_spans", "n_positions"])


def _check_inputs(a: torch.Tensor, b: torch.Tensor, first_rows: torch.Tensor, lengths: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 1 or a.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(
            f"span_max wants two (n_positions,) float32 buffers, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if first_rows.shape != lengths.shape or first_rows.dim() != 1:
        raise ValueError(
            f"first_rows and lengths must be (n_spans,), got {tuple(first_rows.shape)}, {tuple(lengths.shape)}."
        )
    if first_rows.dtype != torch.long or lengths.dtype != torch.long:
        raise ValueError("first_rows and lengths must be int64.")
    if any(t.device != a.device for t in (b, first_rows, lengths)):
        raise ValueError("span_max's tensors must be on one device.")


def span_max_triton(
    a: torch.Tensor, b: torch.Tensor, first: int, first_rows: torch.Tensor, lengths: torch.Tensor, max_len: int
) -> torch.Tensor:
    """The kernel's launch; same contract as span_max."""
    _check_inputs(a, b, first_rows, lengths)
    n_spans = lengths.numel()
    out = torch.empty(n_spans, dtype=torch.float32, device=a.device)
    if n_spans == 0:
        return out
    max_len_tiles = -(-max(max_len, 1) // _BLOCK_P) * _BLOCK_P
    grid = (-(-n_spans // _BLOCK_S),)
    _triton_kernels(interpreting())[grid](
        a, b, first_rows, lengths, out, first, n_spans, a.numel(),
        MAX_LEN=max_len_tiles, BLOCK_S=_BLOCK_S, BLOCK_P=_BLOCK_P,
    )  # fmt: skip
    return out


def span_max_reference(
    a: torch.Tensor, b: torch.Tensor, first: int, first_rows: torch.Tensor, lengths: torch.Tensor, max_len: int
) -> torch.Tensor:
    """Plain torch: a padded (n_spans, max_len) gather of the positions, masked past each span, reduced by rows."""
    _check_inputs(a, b, first_rows, lengths)
    if a.numel() == 0:
        return torch.zeros(lengths.numel(), dtype=torch.float32, device=a.device)
    offsets = torch.arange(max_len, device=lengths.device)
    positions = (first + first_rows[:, None] + offsets[None, :]).clamp(max=a.numel() - 1)  # (n_spans, max_len)
    values = a[positions] + b[positions]
    return values.masked_fill(offsets[None, :] >= lengths[:, None], 0.0).amax(dim=1).clamp(min=0)


def span_max(
    a: torch.Tensor, b: torch.Tensor, first: int, first_rows: torch.Tensor, lengths: torch.Tensor, max_len: int
) -> torch.Tensor:
    """(n_spans,) float32: each span's max(0, max of a + b over its positions); lengths at most max_len (see the
    module's docstring). The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if use_triton(a, b, first_rows, lengths):
        return span_max_triton(a, b, first, first_rows, lengths, max_len)
    return span_max_reference(a, b, first, first_rows, lengths, max_len)
