"""A captured decode step's key set: sinks, retrieved tokens and window packed at compact positions, keys rotated.

    sink_keys, sink_values      (nheads_kv, S, headdim)        the sinks (S may be 0)
    rows_source                 (n_rows, 2, nheads_kv, headdim) stored tokens: part 0 keys, part 1 values (on
                                CUDA the pinned host rows' device alias: reads cross PCIe, nothing is copied)
    rows                        (B,) int64                     the retrieved tokens' rows in rows_source
    n_retrieved                 () or (1,) int64 on the device how many of them are valid (<= B)
    window_keys, window_values  (nheads_kv, W, headdim)        the window's buffers, whole capacity
    cos, sin                    (P, headdim)                   RoPE of positions 0..P-1, P = S + B + W
    keys, values                (nheads_kv, P, headdim)        out: place p holds sink p (p < S), retrieved token
                                                               p - S (p < S + n), else window slot p - S - n
                                                               (clamped to the last slot); keys rotated to p

Packing the way the step did it in torch (a gather of the rows, a concatenation of sinks, rows and window, a
gather of places, for keys and values, then RoPE as x * cos + rotate_half(x) * sin) launches about a dozen
kernels a layer and moves the packed set through memory six times or so. The kernel reads each source element
once (its rotation partner from L1) and writes the packed keys and values once.

Keys are rotated in float32 and rounded once; the reference rotates in the inputs' dtype, as RopeTable.rotate
does, so half-precision results differ by its rounding. headdim must be a power of two.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK_P = 32  # packed places per program


def _pack_rotate_kernel(
    sink_k_ptr, sink_v_ptr, rows_source_ptr, rows_ptr, n_retrieved_ptr, window_k_ptr, window_v_ptr, cos_ptr, sin_ptr,
    keys_ptr, values_ptr,
    n_sink, budget, window_capacity, n_packed,
    stride_sink_h, stride_sink_t, stride_row, stride_part, stride_row_h, stride_window_h, stride_window_t,
    stride_table, stride_out_h, stride_out_t,
    HEADDIM: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """BLOCK_P packed places of one KV head: each from its source, the key rotated to its place."""
    head = tl.program_id(1).to(tl.int64)
    place = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    dim = tl.arange(0, HEADDIM)
    partner = (dim + HEADDIM // 2) % HEADDIM  # rotate_half's source column
    n_retrieved = tl.load(n_retrieved_ptr)
    in_packed = place < n_packed
    is_sink = in_packed & (place < n_sink)
    is_retrieved = in_packed & (place >= n_sink) & (place < n_sink + n_retrieved)
    is_window = in_packed & (place >= n_sink + n_retrieved)
    sink_at = tl.where(is_sink, place, 0).to(tl.int64)
    row_at = tl.load(rows_ptr + tl.where(is_retrieved, place - n_sink, 0), mask=is_retrieved, other=0)
    window_at = tl.minimum(tl.where(is_window, place - n_sink - n_retrieved, 0), window_capacity - 1).to(tl.int64)
    sink_off = head * stride_sink_h + sink_at[:, None] * stride_sink_t
    row_off = row_at[:, None] * stride_row + head * stride_row_h
    window_off = head * stride_window_h + window_at[:, None] * stride_window_t
    key = _packed(sink_k_ptr + sink_off, rows_source_ptr + row_off, window_k_ptr + window_off, dim,
                  is_sink, is_retrieved, is_window)  # fmt: skip
    key_partner = _packed(sink_k_ptr + sink_off, rows_source_ptr + row_off, window_k_ptr + window_off, partner,
                          is_sink, is_retrieved, is_window)  # fmt: skip
    value = _packed(sink_v_ptr + sink_off, rows_source_ptr + stride_part + row_off, window_v_ptr + window_off, dim,
                    is_sink, is_retrieved, is_window)  # fmt: skip
    table = place.to(tl.int64)[:, None] * stride_table + dim[None, :]
    cos = tl.load(cos_ptr + table, mask=in_packed[:, None], other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=in_packed[:, None], other=0.0).to(tl.float32)
    sign = tl.where(dim < HEADDIM // 2, -1.0, 1.0)
    rotated = key * cos + sign[None, :] * key_partner * sin
    out = head * stride_out_h + place.to(tl.int64)[:, None] * stride_out_t + dim[None, :]
    tl.store(keys_ptr + out, rotated.to(keys_ptr.dtype.element_ty), mask=in_packed[:, None])
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=in_packed[:, None])


def _packed(sink_ptrs, row_ptrs, window_ptrs, columns, is_sink, is_retrieved, is_window):
    """(BLOCK_P, HEADDIM) float32: columns of each place's source row (sink, stored row or window slot)."""
    sink = tl.load(sink_ptrs + columns[None, :], mask=is_sink[:, None], other=0.0).to(tl.float32)
    row = tl.load(row_ptrs + columns[None, :], mask=is_retrieved[:, None], other=0.0).to(tl.float32)
    window = tl.load(window_ptrs + columns[None, :], mask=is_window[:, None], other=0.0).to(tl.float32)
    return sink + row + window


_PACKED = _packed  # the plain function; _triton_kernels binds _packed to its JIT wrapper


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _packed
    import triton
    import triton.language

    tl = triton.language
    _packed = triton.jit(_PACKED)  # the kernel calls the helper by this global name
    return triton.jit(_pack_rotate_kernel)


def _check_inputs(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin):
    nheads_kv, window_capacity, headdim = window_keys.shape
    n_packed = sink_keys.shape[1] + rows.numel() + window_capacity
    if window_values.shape != window_keys.shape or sink_values.shape != sink_keys.shape:
        raise ValueError("pack_rotate wants keys and values of the same shape for the sinks and for the window.")
    if sink_keys.shape[::2] != (nheads_kv, headdim) or rows_source.shape[1:] != (2, nheads_kv, headdim):
        raise ValueError(
            f"pack_rotate wants sinks (nheads_kv, S, headdim) and rows (n, 2, nheads_kv, headdim) like the window "
            f"{tuple(window_keys.shape)}, got {tuple(sink_keys.shape)} and {tuple(rows_source.shape)}."
        )
    if rows.dim() != 1 or rows.dtype != torch.long or n_retrieved.numel() != 1:
        raise ValueError("pack_rotate wants rows (B,) int64 and one n_retrieved.")
    if cos.shape != (n_packed, headdim) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be (P, headdim) = ({n_packed}, {headdim}), got {tuple(cos.shape)}.")
    if window_capacity == 0 or headdim & (headdim - 1):
        raise ValueError(f"pack_rotate needs a window and a power-of-two headdim, got {tuple(window_keys.shape)}.")


def pack_rotate_reference(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin):
    """Plain torch: the rows gathered, sources concatenated, places gathered, keys rotated in their dtype."""
    _check_inputs(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin)
    retrieved = rows_source.index_select(0, rows)  # (B, 2, nheads_kv, headdim)
    n_sink, budget = sink_keys.shape[1], rows.numel()
    n_packed = cos.shape[0]
    place = torch.arange(n_packed, device=window_keys.device)
    source = torch.where(place < n_sink + n_retrieved, place, place - n_retrieved + budget).clamp(max=n_packed - 1)

    def packed(sinks: torch.Tensor, part: int, window: torch.Tensor) -> torch.Tensor:
        sources = torch.cat([sinks, retrieved[:, part].transpose(0, 1), window], dim=1)  # (nheads_kv, P, headdim)
        return sources.index_select(1, source)

    keys = packed(sink_keys, 0, window_keys)
    half = keys.shape[-1] // 2
    rotated = keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin
    return rotated, packed(sink_values, 1, window_values)


def pack_rotate_triton(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin):
    """The kernel's launch; same contract as pack_rotate."""
    _check_inputs(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin)
    nheads_kv, window_capacity, headdim = window_keys.shape
    n_packed = cos.shape[0]
    keys = torch.empty(nheads_kv, n_packed, headdim, dtype=window_keys.dtype, device=window_keys.device)
    values = torch.empty_like(keys)
    tensors = (sink_keys, sink_values, rows_source, window_keys, window_values, cos, sin)
    if any(t.stride(-1) != 1 for t in tensors) or sink_keys.stride() != sink_values.stride():
        raise ValueError("pack_rotate wants the last dimension contiguous and sink keys and values laid out alike.")
    if window_keys.stride() != window_values.stride() or cos.stride() != sin.stride():
        raise ValueError("pack_rotate wants the window's keys and values, and cos and sin, laid out alike.")
    sinks = (sink_keys, sink_values) if sink_keys.shape[1] else (window_keys, window_values)  # never read if empty
    grid = (-(-n_packed // _BLOCK_P), nheads_kv)
    _triton_kernels(interpreting())[grid](
        *sinks, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin, keys, values,
        sink_keys.shape[1], rows.numel(), window_capacity, n_packed,
        sinks[0].stride(0), sinks[0].stride(1), rows_source.stride(0), rows_source.stride(1), rows_source.stride(2),
        window_keys.stride(0), window_keys.stride(1), cos.stride(0), keys.stride(0), keys.stride(1),
        HEADDIM=headdim, BLOCK_P=_BLOCK_P,
    )  # fmt: skip
    return keys, values


def pack_rotate(sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin):
    """Packed keys (rotated to their places) and values (nheads_kv, P, headdim): see the module's docstring.
    The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    args = (sink_keys, sink_values, rows_source, rows, n_retrieved, window_keys, window_values, cos, sin)
    if use_triton(*(t for t in args if t.numel())):
        return pack_rotate_triton(*args)
    return pack_rotate_reference(*args)
