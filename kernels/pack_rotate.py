"""A captured decode step's key set and query: sinks, retrieved tokens, evidence and window packed at compact
positions, keys and the query rotated.

    query                       (nheads, headdim)              the step's query, pre-RoPE
    window_length               (1,) int64 on the device       the window's tokens before this step's: the step's
                                                               own key sits at window slot window_length
    sink_keys, sink_values      (nheads_kv, S, headdim)        the sinks (S may be 0)
    rows_source                 (n_rows, 2, nheads_kv, headdim) stored tokens: part 0 keys, part 1 values (on
                                CUDA the pinned host rows' device alias: reads cross PCIe, nothing is copied)
    rows                        (B,) or (nheads_kv, B) int64   the retrieved tokens' rows in rows_source, shared by
                                                               the KV heads or each head's own (a token selection's)
    n_retrieved                 () or (1,) int64 on the device how many of them are valid (<= B)
    evidence_keys, _values      (nheads_kv, E, headdim)        stored tokens a question's reread encoded anew
                                                               (``ltri.evidence``; E may be 0)
    window_keys, window_values  (nheads_kv, W, headdim)        the window's buffers, whole capacity
    cos, sin                    (P, headdim)                   RoPE of positions 0..P-1, P = S + B + E + W
    cache_slots (optional)      (>= n_rows,) or                each stored row's place in cache_rows, -1 if none:
                                (nheads_kv, >= n_rows) int32   shared with shared rows, each KV head's with its own
    cache_rows                  (C, 2, nheads_kv, headdim)     device copies of rows (``offload.row_cache``): a
                                                               retrieved row with a slot is read there, not over PCIe
                                                               (with slots per head, head h's part of place i is
                                                               head h's row of slot i)
    cache_out                   (B, 2, nheads_kv, headdim)     where the retrieved rows (pre-RoPE) are written, in
                                                               order, for the next step's cache (first n_retrieved;
                                                               head h's part: head h's rows)
    step_key, step_value        (nheads_kv, headdim)           (optional, the four together) the step's own key and
    (optional)                                                 value, pre-RoPE: written to the window's slot
    step_position               (1,) int64                     window_length (and step_position to window_positions
    window_positions            (W,) int64                     there), and packed from these, not from that slot;
                                                               without them the window already holds them
  returns
    query_rotated               (nheads, 1, headdim)           the query rotated to the step's place,
                                                               n_valid - 1 = S + n_retrieved + E + window_length
    keys, values                (nheads_kv, P, headdim)        place p holds sink p (p < S), retrieved token
                                                               p - S (p < S + n), evidence token p - S - n
                                                               (p < S + n + E), else window slot p - S - n - E
                                                               (clamped to the last slot); keys rotated to p
    n_valid                     (nheads_kv,) int64             the valid keys of each KV head (the same for all)

Packing the way the step did it in torch (a gather of the rows, a concatenation of sinks, rows and window, a
gather of places, for keys and values, then RoPE as x * cos + rotate_half(x) * sin, and the same for the query at
a place computed on the device) took about twenty kernels a layer (counted in the code it replaced) and moved the
packed set through memory several times. The kernel reads each source element once (its rotation partner from L1)
and writes the packed keys and values once; the first program of each KV head also rotates the head's query
group. On the H100 (bf16, Llama-3-8B layer, 4416 places) it took 0.0179 ms against 0.1646 ms for those ops, graph
replays (``pack_rotate`` in ``benchmarks/speed/results/attention_h100_7e52b02.json``).

With the step's own token given, the kernel also does the three writes into the window that the step made before
it (the key, the value, the position: three launches a layer; the key's and value's ``index_elementwise_kernel``
took 0.16 ms of a 128K decode step of an 8B-shaped model in the profile of
``benchmarks/speed/results/e2e_dense_off_h100_6adea05_profile_profile_131072.txt``, 512 calls in 8 steps). Each
KV head's first program writes them; every place at that slot reads the token from the inputs, so that no program
reads the slot while it is written.

Keys and the query are rotated as RopeTable.rotate (the eager step) rotates them in the inputs' dtype: each product
rounded to it, then the sum. Rounding once in float32 instead moved half-precision keys by an ulp now and then, and
on the H100 a bf16 model's captured steps then chose other spans than its eager steps in 9 of 40 steps
(``tests/test_captured_decode.py``, run at 9cb8722). float16 products below float16's normal range (6e-5) are
rounded at float16's normal precision, then again by the final cast: a rare double rounding. headdim must be a power
of two.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch


def _pack_rotate_kernel(
    query_ptr, window_length_ptr, sink_k_ptr, sink_v_ptr, rows_source_ptr, rows_ptr, n_retrieved_ptr,
    evidence_k_ptr, evidence_v_ptr, window_k_ptr, window_v_ptr, cos_ptr, sin_ptr,
    query_out_ptr, keys_ptr, values_ptr, n_valid_ptr, cache_slots_ptr, cache_rows_ptr, cache_out_ptr,
    step_k_ptr, step_v_ptr, step_position_ptr, window_positions_ptr,
    n_sink, n_evidence, window_capacity, n_packed, group,
    stride_q_h, stride_sink_h, stride_sink_t, stride_row, stride_part, stride_row_h, stride_rows_h, stride_slots_h,
    stride_evidence_h, stride_evidence_t, stride_window_h, stride_window_t,
    stride_table, stride_out_h, stride_out_t, stride_step_h,
    HEADDIM: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_BLOCK: tl.constexpr, DROP_BITS: tl.constexpr,
    HAS_CACHE: tl.constexpr, WRITES_STEP: tl.constexpr,
):  # fmt: skip
    """BLOCK_P packed places of one KV head: each from its source, the key rotated to its place; the first program
    of the head also rotates its query group and writes its valid count. HAS_CACHE: a retrieved row with a slot in
    the row cache (the head's own slots where stride_slots_h is not 0) is read from the cache's copy (same layout as
    the stored rows), and every retrieved row is written to cache_out at its place in the retrieved list.
    WRITES_STEP: the step's own key and value come from step_k and step_v, and the head's first program writes them
    to the window's slot window_length (KV head 0's, the position too)."""
    head = tl.program_id(1).to(tl.int64)
    place = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    dim = tl.arange(0, HEADDIM)
    partner = (dim + HEADDIM // 2) % HEADDIM  # rotate_half's source column
    sign = tl.where(dim < HEADDIM // 2, -1.0, 1.0)
    n_retrieved = tl.load(n_retrieved_ptr)
    window_start = n_sink + n_retrieved + n_evidence
    window_length = tl.load(window_length_ptr)
    if tl.program_id(0) == 0:
        at = window_start + window_length  # the step's own place
        heads = head * group + tl.arange(0, GROUP_BLOCK)
        in_group = (tl.arange(0, GROUP_BLOCK) < group)[:, None]
        q = tl.load(query_ptr + heads[:, None] * stride_q_h + dim[None, :], mask=in_group, other=0.0)
        q_partner = tl.load(query_ptr + heads[:, None] * stride_q_h + partner[None, :], mask=in_group, other=0.0)
        cos_q = tl.load(cos_ptr + at * stride_table + dim).to(tl.float32)
        sin_q = tl.load(sin_ptr + at * stride_table + dim).to(tl.float32)
        signed_sin_q = sign[None, :] * sin_q[None, :]
        q_rotated = _rope(q.to(tl.float32), q_partner.to(tl.float32), cos_q[None, :], signed_sin_q, DROP_BITS)
        q_rotated = q_rotated.to(query_out_ptr.dtype.element_ty)
        q_out = query_out_ptr + heads[:, None] * HEADDIM + dim[None, :]
        tl.store(q_out, q_rotated, mask=in_group)
        tl.store(n_valid_ptr + head, at + 1)
        if WRITES_STEP:
            window_slot = head * stride_window_h + window_length * stride_window_t + dim
            tl.store(window_k_ptr + window_slot, tl.load(step_k_ptr + head * stride_step_h + dim))
            tl.store(window_v_ptr + window_slot, tl.load(step_v_ptr + head * stride_step_h + dim))
            if head == 0:
                tl.store(window_positions_ptr + window_length, tl.load(step_position_ptr))
    in_packed = place < n_packed
    is_sink = in_packed & (place < n_sink)
    is_retrieved = in_packed & (place >= n_sink) & (place < n_sink + n_retrieved)
    is_evidence = in_packed & (place >= n_sink + n_retrieved) & (place < window_start)
    is_window = in_packed & (place >= window_start)
    sink_at = tl.where(is_sink, place, 0).to(tl.int64)
    row_at = tl.load(rows_ptr + head * stride_rows_h + tl.where(is_retrieved, place - n_sink, 0), mask=is_retrieved,
                     other=0)  # fmt: skip
    evidence_at = tl.where(is_evidence, place - n_sink - n_retrieved, 0).to(tl.int64)
    window_at = tl.minimum(tl.where(is_window, place - window_start, 0), window_capacity - 1).to(tl.int64)
    if WRITES_STEP:  # the step's own slot is read from the inputs: the head's first program is writing it
        is_step = is_window & (window_at == window_length)
        is_window = is_window & ~is_step
    sink_off = head * stride_sink_h + sink_at[:, None] * stride_sink_t
    row_off = row_at[:, None] * stride_row + head * stride_row_h
    evidence_off = head * stride_evidence_h + evidence_at[:, None] * stride_evidence_t
    window_off = head * stride_window_h + window_at[:, None] * stride_window_t
    if HAS_CACHE:
        slot = tl.load(cache_slots_ptr + head * stride_slots_h + row_at, mask=is_retrieved, other=-1)
        is_cached = is_retrieved & (slot >= 0)
        is_stored = is_retrieved & (slot < 0)
        cache_off = tl.where(is_cached, slot, 0).to(tl.int64)[:, None] * stride_row + head * stride_row_h
    else:
        is_cached = is_retrieved & (place < 0)
        is_stored = is_retrieved
        cache_off = row_off
    key = _packed(sink_k_ptr + sink_off, rows_source_ptr + row_off, cache_rows_ptr + cache_off,
                  evidence_k_ptr + evidence_off, window_k_ptr + window_off, dim,
                  is_sink, is_stored, is_cached, is_evidence, is_window, HAS_CACHE)  # fmt: skip
    key_partner = _packed(sink_k_ptr + sink_off, rows_source_ptr + row_off, cache_rows_ptr + cache_off,
                          evidence_k_ptr + evidence_off, window_k_ptr + window_off, partner,
                          is_sink, is_stored, is_cached, is_evidence, is_window, HAS_CACHE)  # fmt: skip
    value = _packed(sink_v_ptr + sink_off, rows_source_ptr + stride_part + row_off,
                    cache_rows_ptr + stride_part + cache_off, evidence_v_ptr + evidence_off,
                    window_v_ptr + window_off, dim, is_sink, is_stored, is_cached, is_evidence, is_window,
                    HAS_CACHE)  # fmt: skip
    if WRITES_STEP:
        step_k = step_k_ptr + head * stride_step_h
        key += tl.where(is_step[:, None], tl.load(step_k + dim).to(tl.float32)[None, :], 0.0)
        key_partner += tl.where(is_step[:, None], tl.load(step_k + partner).to(tl.float32)[None, :], 0.0)
        step_v = tl.load(step_v_ptr + head * stride_step_h + dim).to(tl.float32)
        value += tl.where(is_step[:, None], step_v[None, :], 0.0)
    if HAS_CACHE:  # the retrieved rows as read, pre-RoPE, at their places in the retrieved list
        out_row = tl.where(is_retrieved, place - n_sink, 0).to(tl.int64)[:, None] * stride_row + head * stride_row_h
        cache_out = cache_out_ptr + out_row + dim[None, :]
        tl.store(cache_out, key.to(cache_out_ptr.dtype.element_ty), mask=is_retrieved[:, None])
        tl.store(cache_out + stride_part, value.to(cache_out_ptr.dtype.element_ty), mask=is_retrieved[:, None])
    table = place.to(tl.int64)[:, None] * stride_table + dim[None, :]
    cos = tl.load(cos_ptr + table, mask=in_packed[:, None], other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=in_packed[:, None], other=0.0).to(tl.float32)
    rotated = _rope(key, key_partner, cos, sign[None, :] * sin, DROP_BITS).to(keys_ptr.dtype.element_ty)
    out = head * stride_out_h + place.to(tl.int64)[:, None] * stride_out_t + dim[None, :]
    tl.store(keys_ptr + out, rotated, mask=in_packed[:, None])
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=in_packed[:, None])


def _rope(x, partner, cos, signed_sin, DROP_BITS: tl.constexpr):
    """x * cos + rotate_half(x) * sin (float32 operands; signed_sin carries rotate_half's sign), each product rounded
    to the output dtype as torch rounds it, the sum left for the caller's cast to round."""
    return _round_mantissa(x * cos, DROP_BITS) + _round_mantissa(partner * signed_sin, DROP_BITS)


def _round_mantissa(x, DROP_BITS: tl.constexpr):
    """float32 x rounded to nearest even at DROP_BITS fewer mantissa bits (16: bfloat16's, 13: float16's, 0: as is).
    Integer operations on the bits, not a cast there and back: on the H100 the compiler removed such a round trip
    after a product of two upcast half values and fused the product into the sum (seen at 7e52b02: the query test
    in tests/test_kernel_pack_rotate.py failed on the H100 with casts and passed with this, at db0b48a)."""
    if DROP_BITS == 0:  # if/else, not an early return: the compiler also builds the code after a return
        rounded = x
    else:
        bits = x.to(tl.int32, bitcast=True)
        ties_to_even = (bits >> DROP_BITS) & 1
        bits = (bits + ((1 << (DROP_BITS - 1)) - 1) + ties_to_even) & ~((1 << DROP_BITS) - 1)
        rounded = bits.to(tl.float32, bitcast=True)
    return rounded


def _packed(
    sink_ptrs, row_ptrs, cache_ptrs, evidence_ptrs, window_ptrs, columns, is_sink, is_stored, is_cached, is_evidence,
    is_window, HAS_CACHE: tl.constexpr,
):  # fmt: skip
    """(BLOCK_P, HEADDIM) float32: columns of each place's source row (sink, stored row, its cached copy with
    HAS_CACHE, evidence or window slot)."""
    sink = tl.load(sink_ptrs + columns[None, :], mask=is_sink[:, None], other=0.0).to(tl.float32)
    row = tl.load(row_ptrs + columns[None, :], mask=is_stored[:, None], other=0.0).to(tl.float32)
    evidence = tl.load(evidence_ptrs + columns[None, :], mask=is_evidence[:, None], other=0.0).to(tl.float32)
    window = tl.load(window_ptrs + columns[None, :], mask=is_window[:, None], other=0.0).to(tl.float32)
    packed = sink + row + evidence + window
    if HAS_CACHE:
        packed += tl.load(cache_ptrs + columns[None, :], mask=is_cached[:, None], other=0.0).to(tl.float32)
    return packed


# plain functions; _triton_kernels binds their JIT wrappers
_PACKED, _ROPE, _ROUND_MANTISSA = _packed, _rope, _round_mantissa


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl, _packed, _rope, _round_mantissa
    import triton
    import triton.language

    tl = triton.language
    _packed, _rope, _round_mantissa = triton.jit(_PACKED), triton.jit(_ROPE), triton.jit(_ROUND_MANTISSA)
    return triton.jit(_pack_rotate_kernel)


@dataclass(frozen=True)
class StepSources:
    """What a captured step's attention reads; shapes in the module's docstring."""

    query: torch.Tensor
    window_length: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    rows_source: torch.Tensor
    rows: torch.Tensor
    n_retrieved: torch.Tensor
    evidence_keys: torch.Tensor
    evidence_values: torch.Tensor
    window_keys: torch.Tensor
    window_values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cache_slots: torch.Tensor | None = None
    cache_rows: torch.Tensor | None = None
    cache_out: torch.Tensor | None = None
    step_key: torch.Tensor | None = None
    step_value: torch.Tensor | None = None
    step_position: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors given (the cache's three only with a cache, the step's four only with them)."""
        return tuple(t for t in (getattr(self, f.name) for f in fields(self)) if t is not None)

    @property
    def has_cache(self) -> bool:
        return self.cache_slots is not None

    @property
    def writes_step(self) -> bool:
        return self.step_key is not None


class PackedStep(NamedTuple):
    query: torch.Tensor  # (nheads, 1, headdim) rotated
    keys: torch.Tensor  # (nheads_kv, P, headdim) rotated
    values: torch.Tensor  # (nheads_kv, P, headdim)
    n_valid: torch.Tensor  # (nheads_kv,) int64


_DROP_BITS = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}  # float32's mantissa bits less the dtype's


def _check_inputs(s: StepSources) -> None:
    nheads_kv, window_capacity, headdim = s.window_keys.shape
    n_packed = s.sink_keys.shape[1] + s.rows.shape[-1] + s.evidence_keys.shape[1] + window_capacity
    pairs = ((s.sink_keys, s.sink_values), (s.evidence_keys, s.evidence_values), (s.window_keys, s.window_values))
    segments_fit = all(keys.dim() == 3 and keys.shape[::2] == (nheads_kv, headdim) for keys, _ in pairs)
    if not segments_fit or s.rows_source.shape[1:] != (2, nheads_kv, headdim):
        raise ValueError(
            f"pack_rotate wants sinks and evidence (nheads_kv, n, headdim) and rows (n, 2, nheads_kv, headdim) like "
            f"the window {tuple(s.window_keys.shape)}, got {tuple(s.sink_keys.shape)}, "
            f"{tuple(s.evidence_keys.shape)} and {tuple(s.rows_source.shape)}."
        )
    if any(keys.shape != values.shape for keys, values in pairs):
        raise ValueError("pack_rotate wants keys and values of the same shape for the sinks, evidence and window.")
    if s.query.dim() != 2 or s.query.shape[1] != headdim or s.query.shape[0] % nheads_kv:
        raise ValueError(f"pack_rotate wants the query (nheads, {headdim}) in groups of {nheads_kv} KV heads, "
                         f"got {tuple(s.query.shape)}.")  # fmt: skip
    rows_fit = s.rows.dim() == 1 or (s.rows.dim() == 2 and s.rows.shape[0] == nheads_kv)
    if not rows_fit or s.rows.dtype != torch.long or s.n_retrieved.numel() != 1 or s.window_length.numel() != 1:
        raise ValueError(f"pack_rotate wants rows (B,) or ({nheads_kv}, B) int64, one n_retrieved and one "
                         f"window_length, got rows {s.rows.dtype} {tuple(s.rows.shape)}.")  # fmt: skip
    if s.cos.shape != (n_packed, headdim) or s.sin.shape != s.cos.shape:
        raise ValueError(f"cos and sin must be (P, headdim) = ({n_packed}, {headdim}), got {tuple(s.cos.shape)}.")
    dtypes = {t.dtype for t in (s.query, s.sink_keys, s.rows_source, s.evidence_keys, s.window_keys, s.cos, s.sin)}
    if len(dtypes) != 1 or not s.query.dtype.is_floating_point:
        raise ValueError(f"pack_rotate wants one float dtype for the query, keys, rows and RoPE table, got {dtypes}.")
    if window_capacity == 0 or headdim & (headdim - 1):
        raise ValueError(f"pack_rotate needs a window and a power-of-two headdim, got {tuple(s.window_keys.shape)}.")
    if s.has_cache:
        _check_cache(s)
    if s.writes_step:
        _check_step(s)


def _check_step(s: StepSources) -> None:
    """The step's own token: key and value (nheads_kv, headdim) in the window's dtype, its position and the window's."""
    if s.step_value is None or s.step_position is None or s.window_positions is None:
        raise ValueError("pack_rotate's step token needs step_key, step_value, step_position and window_positions.")
    shape = (s.window_keys.shape[0], s.window_keys.shape[2])
    if s.step_key.shape != shape or s.step_value.shape != shape or s.step_key.dtype != s.window_keys.dtype:
        raise ValueError(f"the step's key and value must be {shape} in the window's dtype, got "
                         f"{tuple(s.step_key.shape)} {s.step_key.dtype}.")  # fmt: skip
    if s.step_value.dtype != s.step_key.dtype or s.step_key.stride() != s.step_value.stride():
        raise ValueError("the step's key and value must be laid out alike, in one dtype.")
    positions_fit = s.window_positions.shape == (s.window_keys.shape[1],) and s.step_position.numel() == 1
    if not positions_fit or {s.window_positions.dtype, s.step_position.dtype} != {torch.long}:
        raise ValueError(f"the window's positions must be ({s.window_keys.shape[1]},) int64 and the step's one int64, "
                         f"got {tuple(s.window_positions.shape)} {s.window_positions.dtype}.")  # fmt: skip


def _check_cache(s: StepSources) -> None:
    """The row cache's tensors: slots int32, the cached rows and cache_out laid out as the stored rows."""
    if s.cache_rows is None or s.cache_out is None:
        raise ValueError("pack_rotate's row cache needs cache_slots, cache_rows and cache_out.")
    slots_shape = "(n,)" if s.rows.dim() == 1 else f"({s.rows.shape[0]}, n)"  # as the rows: shared or per head
    slots_fit = s.cache_slots.dim() == s.rows.dim() and s.cache_slots.shape[:-1] == s.rows.shape[:-1]
    if not slots_fit or s.cache_slots.dtype != torch.int32 or s.cache_slots.stride(-1) != 1:
        raise ValueError(f"cache_slots must be {slots_shape} int32 like the rows, got {s.cache_slots.dtype} "
                         f"{tuple(s.cache_slots.shape)}.")  # fmt: skip
    layout = s.rows_source.shape[1:]
    if s.cache_rows.shape[1:] != layout or s.cache_out.shape != (s.rows.shape[-1], *layout):
        raise ValueError(f"cache_rows must be (C, {', '.join(map(str, layout))}) and cache_out ({s.rows.shape[-1]}, "
                         f"{', '.join(map(str, layout))}), got {tuple(s.cache_rows.shape)} and "
                         f"{tuple(s.cache_out.shape)}.")  # fmt: skip
    if s.cache_rows.dtype != s.rows_source.dtype or s.cache_out.dtype != s.rows_source.dtype:
        raise ValueError("the row cache must hold the stored rows' dtype.")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def pack_rotate_reference(s: StepSources) -> PackedStep:
    """Plain torch: the step's token written to the window (when given), the rows gathered, sources concatenated,
    places gathered, keys and query rotated in their dtype."""
    _check_inputs(s)
    if s.writes_step:
        slot = s.window_length.reshape(1)
        s.window_keys.index_copy_(1, slot, s.step_key[:, None])
        s.window_values.index_copy_(1, slot, s.step_value[:, None])
        s.window_positions.index_copy_(0, slot, s.step_position.reshape(1))
    nheads_kv = s.window_keys.shape[0]
    rows = s.rows.expand(nheads_kv, -1)  # (nheads_kv, B): each KV head's rows
    heads = torch.arange(nheads_kv, device=rows.device)[:, None]
    retrieved = s.rows_source[rows, :, heads]  # (nheads_kv, B, 2, hd)
    n_sink, budget, n_packed = s.sink_keys.shape[1], rows.shape[1], s.cos.shape[0]
    n_retrieved = s.n_retrieved.reshape(1)
    if s.has_cache:  # rows with a slot read from the cache; all written, as read, to cache_out
        slots = s.cache_slots.expand(nheads_kv, -1).gather(1, rows).long()  # (nheads_kv, B): each head's
        cached = s.cache_rows[slots.clamp(min=0), :, heads]
        retrieved = torch.where((slots >= 0)[..., None, None], cached, retrieved)
        valid = (torch.arange(budget, device=rows.device) < n_retrieved)[:, None, None, None]
        s.cache_out.copy_(torch.where(valid, retrieved.permute(1, 2, 0, 3), s.cache_out))
    place = torch.arange(n_packed, device=s.window_keys.device)
    # the sources concatenated hold sinks, B rows, evidence, window: past the valid rows a place reads B - n later
    source = torch.where(place < n_sink + n_retrieved, place, place - n_retrieved + budget).clamp(max=n_packed - 1)

    def packed(sinks: torch.Tensor, part: int, evidence: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        sources = torch.cat([sinks, retrieved[:, :, part], evidence, window], dim=1)  # (nheads_kv, P, headdim)
        return sources.index_select(1, source)

    at = n_sink + n_retrieved + s.evidence_keys.shape[1] + s.window_length.reshape(1)  # (1,) the step's own place
    query = _rotate(s.query, s.cos.index_select(0, at), s.sin.index_select(0, at))[:, None]
    keys = _rotate(packed(s.sink_keys, 0, s.evidence_keys, s.window_keys), s.cos, s.sin)
    n_valid = (at + 1).expand(keys.shape[0]).contiguous()
    return PackedStep(query, keys, packed(s.sink_values, 1, s.evidence_values, s.window_values), n_valid)


class PackLaunch(NamedTuple):
    """Launch shape of the kernel (benchmarks/speed/attention.py sweeps it)."""

    block_p: int  # packed places per program
    num_warps: int


# Since the evidence segment, 16 places on 8 warps: 0.0173 ms a Llama-3-8B layer on the H100 against 0.0222 ms for
# the earlier 32 on 4 (benchmarks/speed/results/attention_h100_b97257e.json, 4416 packed keys); ptxas: 50 registers
# a thread, no spills, at headdim 128 in half precision (kernel_resources_sm90.jsonl); other shapes untimed.
DEFAULT_LAUNCH = PackLaunch(16, 8)


def pack_rotate_triton(s: StepSources, launch: PackLaunch | None = None) -> PackedStep:
    """The kernel's launch; same contract as pack_rotate. launch: DEFAULT_LAUNCH unless given."""
    launch = launch or DEFAULT_LAUNCH
    _check_inputs(s)
    if s.query.dtype not in _DROP_BITS:
        raise ValueError(f"the pack_rotate kernel takes float32, float16 or bfloat16, got {s.query.dtype}.")
    nheads_kv, window_capacity, headdim = s.window_keys.shape
    n_packed = s.cos.shape[0]
    keys = torch.empty(nheads_kv, n_packed, headdim, dtype=s.window_keys.dtype, device=s.window_keys.device)
    values = torch.empty_like(keys)
    query = torch.empty(s.query.shape[0], 1, headdim, dtype=s.query.dtype, device=s.query.device)
    n_valid = torch.empty(nheads_kv, dtype=torch.long, device=keys.device)
    if any(t.stride(-1) != 1 for t in s.tensors() if t.dim() > 1) or s.sink_keys.stride() != s.sink_values.stride():
        raise ValueError("pack_rotate wants the last dimension contiguous and sink keys and values laid out alike.")
    if s.window_keys.stride() != s.window_values.stride() or s.cos.stride() != s.sin.stride():
        raise ValueError("pack_rotate wants the window's keys and values, and cos and sin, laid out alike.")
    if s.evidence_keys.stride() != s.evidence_values.stride():
        raise ValueError("pack_rotate wants the evidence's keys and values laid out alike.")
    window = (s.window_keys, s.window_values)
    sinks = (s.sink_keys, s.sink_values) if s.sink_keys.shape[1] else window  # unread when empty
    evidence = (s.evidence_keys, s.evidence_values) if s.evidence_keys.shape[1] else window
    group = s.query.shape[0] // nheads_kv
    grid = (-(-n_packed // launch.block_p), nheads_kv)
    if s.has_cache and not (s.cache_rows.stride() == s.cache_out.stride() == s.rows_source.stride()):
        raise ValueError("pack_rotate wants the row cache laid out as the stored rows (contiguous).")
    cache = (s.cache_slots, s.cache_rows, s.cache_out) if s.has_cache else (s.rows, s.rows_source, s.rows_source)
    step = (*window, s.rows, s.rows)  # unread without the step's token
    if s.writes_step:
        if s.window_positions.stride(0) != 1:
            raise ValueError("pack_rotate wants the window's positions contiguous.")
        step = (s.step_key, s.step_value, s.step_position, s.window_positions)
    _triton_kernels(interpreting())[grid](
        s.query, s.window_length, *sinks, s.rows_source, s.rows, s.n_retrieved, *evidence, *window,
        s.cos, s.sin, query, keys, values, n_valid, *cache, *step,
        s.sink_keys.shape[1], s.evidence_keys.shape[1], window_capacity, n_packed, group,
        s.query.stride(0), sinks[0].stride(0), sinks[0].stride(1),
        s.rows_source.stride(0), s.rows_source.stride(1), s.rows_source.stride(2),
        s.rows.stride(0) if s.rows.dim() == 2 else 0, cache[0].stride(0) if s.rows.dim() == 2 else 0,
        evidence[0].stride(0), evidence[0].stride(1),
        s.window_keys.stride(0), s.window_keys.stride(1), s.cos.stride(0), keys.stride(0), keys.stride(1),
        s.step_key.stride(0) if s.writes_step else 0,
        HEADDIM=headdim, BLOCK_P=launch.block_p, GROUP_BLOCK=1 << (group - 1).bit_length(),
        DROP_BITS=_DROP_BITS[keys.dtype], HAS_CACHE=s.has_cache, WRITES_STEP=s.writes_step,
        num_warps=launch.num_warps,
    )  # fmt: skip
    return PackedStep(query, keys, values, n_valid)


def pack_rotate(sources: StepSources) -> PackedStep:
    """The step's rotated query, packed keys (rotated to their places) and values, and valid counts: see the
    module's docstring. The Triton kernel on CUDA (or under TRITON_INTERPRET=1) for float32, float16 and bfloat16,
    the torch reference otherwise."""
    if sources.query.dtype in _DROP_BITS and use_triton(*(t for t in sources.tensors() if t.numel())):
        return pack_rotate_triton(sources)
    return pack_rotate_reference(sources)
