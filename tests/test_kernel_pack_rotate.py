"""Pack-and-rotate kernel (a captured decode step's key set) against its torch reference in float64.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.pack_rotate import (  # noqa: E402
    PackLaunch,
    StepSources,
    pack_rotate,
    pack_rotate_reference,
    pack_rotate_triton,
)

# (n_sink, budget, window capacity, nheads_kv, group, headdim, n_retrieved, window length, evidence): no sinks, none
# or all retrieved, with and without evidence, GQA groups 1, 3 and 4, awkward sizes, the step's own key at the
# window's first and last slot
CASES = [
    (4, 37, 23, 3, 3, 64, 20, 10, 0), (0, 16, 9, 1, 1, 128, 16, 0, 7), (4, 97, 123, 8, 4, 64, 0, 122, 33),
    (64, 123, 50, 2, 4, 128, 97, 49, 0), (4, 37, 23, 3, 3, 64, 20, 10, 19),
]  # fmt: skip
N_ROWS = 500


def make_inputs(
    n_sink, budget, window, nheads_kv, group, headdim, n_retrieved, window_length, n_evidence, dtype, seed=0,
    per_head=False,
):  # fmt: skip
    """per_head: each KV head its own rows (nheads_kv, budget), as after a token selection."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    n_packed = n_sink + budget + n_evidence + window
    angles = torch.arange(n_packed)[:, None] * torch.rand(headdim // 2, generator=generator)[None, :]
    angles = torch.cat([angles, angles], dim=1)
    rows = torch.randint(0, N_ROWS, (nheads_kv, budget) if per_head else (budget,), generator=generator).to(DEVICE)
    return StepSources(
        randn(nheads_kv * group, headdim), torch.tensor([window_length], device=DEVICE),
        randn(nheads_kv, n_sink, headdim), randn(nheads_kv, n_sink, headdim), randn(N_ROWS, 2, nheads_kv, headdim),
        rows, torch.tensor(n_retrieved, device=DEVICE), randn(nheads_kv, n_evidence, headdim),
        randn(nheads_kv, n_evidence, headdim), randn(nheads_kv, window, headdim),
        randn(nheads_kv, window, headdim), angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE),
    )  # fmt: skip


def in_float64(inputs):
    return StepSources(*(t.double() if t.is_floating_point() else t for t in inputs.tensors()))


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_rows", "rows_per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_float64_reference(case, dtype, per_head):
    inputs = make_inputs(*case, dtype, per_head=per_head)
    got = pack_rotate_triton(inputs)
    exact = pack_rotate_reference(in_float64(inputs))
    plain = pack_rotate_reference(inputs)
    assert got.keys.dtype == dtype and got.keys.shape == exact.keys.shape and got.query.shape == exact.query.shape
    assert torch.equal(got.values, plain.values) and torch.equal(got.values.double(), exact.values)  # only moved
    assert torch.equal(got.n_valid, plain.n_valid)
    for part in ("keys", "query"):
        kernel_error = (getattr(got, part).double() - getattr(exact, part)).abs().max().item()
        torch_error = (getattr(plain, part).double() - getattr(exact, part)).abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-6, part
        if dtype != torch.float32:  # rounded where torch rounds: the eager step's keys and query, bit for bit
            assert torch.equal(getattr(got, part), getattr(plain, part)), part


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_rows", "rows_per_head"])
@pytest.mark.parametrize("n_evidence", [0, 5])
def test_places_hold_sinks_then_retrieved_rows_then_evidence_then_the_window(n_evidence, per_head):
    n_sink, budget, window, nheads_kv, n_retrieved, window_length = 3, 8, 6, 2, 5, 4
    sizes = (n_sink, budget, window, nheads_kv, 2, 64, n_retrieved, window_length, n_evidence)
    inputs = make_inputs(*sizes, torch.float32, per_head=per_head)
    n_packed = n_sink + budget + n_evidence + window
    cos, sin = torch.ones(n_packed, 64, device=DEVICE), torch.zeros(n_packed, 64, device=DEVICE)  # no rotation
    inputs = dataclasses.replace(inputs, cos=cos, sin=sin)
    got = pack_rotate_triton(inputs)
    keys, values, rows = got.keys, got.values, inputs.rows.expand(nheads_kv, -1)
    assert torch.equal(keys[:, :n_sink], inputs.sink_keys)
    for head in range(nheads_kv):  # KV head h's retrieved places hold its own rows' keys and values
        stored = inputs.rows_source[rows[head, :n_retrieved], :, head]  # (n_retrieved, 2, headdim)
        assert torch.equal(keys[head, n_sink : n_sink + n_retrieved], stored[:, 0])
        assert torch.equal(values[head, n_sink : n_sink + n_retrieved], stored[:, 1])
    evidence_end = n_sink + n_retrieved + n_evidence
    assert torch.equal(keys[:, n_sink + n_retrieved : evidence_end], inputs.evidence_keys)
    assert torch.equal(values[:, n_sink + n_retrieved : evidence_end], inputs.evidence_values)
    assert torch.equal(keys[:, evidence_end : evidence_end + window], inputs.window_keys)
    assert torch.all(keys[:, evidence_end + window :] == inputs.window_keys[:, -1:])  # past it: the last slot
    assert got.n_valid.tolist() == [evidence_end + window_length + 1] * nheads_kv
    assert torch.equal(got.query[:, 0], inputs.query)


def test_the_query_turns_with_the_steps_own_place():
    inputs = make_inputs(*CASES[0], torch.float32)
    place = int(pack_rotate_triton(inputs).n_valid[0]) - 1
    half = inputs.query.shape[1] // 2
    turned = (
        inputs.query * inputs.cos[place]
        + torch.cat([-inputs.query[:, half:], inputs.query[:, :half]], 1) * inputs.sin[place]
    )
    assert torch.allclose(pack_rotate_triton(inputs).query[:, 0], turned, atol=1e-6)


def test_dispatch_runs_the_kernel_here():
    inputs = make_inputs(*CASES[0], torch.float32)
    for got, expected in zip(pack_rotate(inputs), pack_rotate_triton(inputs), strict=True):
        assert torch.equal(got, expected)


def test_bad_inputs_get_one_sentence():
    inputs = make_inputs(*CASES[0], torch.float32)
    for name, bad, message in [
        ("cos", inputs.cos[:-1], "cos and sin must be"),
        ("rows", inputs.rows.int(), "rows \\(B,\\) or \\(3, B\\) int64"),
        ("rows", inputs.rows.expand(2, -1), "rows \\(B,\\) or \\(3, B\\) int64"),
        ("rows_source", inputs.rows_source[:, :, :1], "sinks and evidence \\(nheads_kv, n, headdim\\)"),
        ("window_values", inputs.window_values[:, :-1], "same shape"),
        ("evidence_keys", inputs.evidence_keys[:1], "sinks and evidence \\(nheads_kv, n, headdim\\)"),
        ("query", inputs.query[:-1], "in groups of 3 KV heads"),
        ("cos", inputs.cos.half(), "one float dtype"),
    ]:
        broken = dataclasses.replace(inputs, **{name: bad})
        for pack in (pack_rotate_triton, pack_rotate_reference):
            with pytest.raises(ValueError, match=message):
                pack(broken)


@pytest.mark.parametrize("launch", [PackLaunch(16, 4), PackLaunch(16, 8), PackLaunch(64, 8)])
def test_every_launch_shape_packs_the_same(launch):
    inputs = make_inputs(*CASES[3], torch.float16)
    expected = pack_rotate_triton(inputs)
    got = pack_rotate_triton(inputs, launch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def with_row_cache(inputs, seed=1, poisoned=False):
    """inputs with a row cache (``ltri.offload.row_cache``) that holds about half of the stored rows at random places:
    copies of them, or (poisoned) other values, so that a test can tell where a place was read from. With rows per
    head, each KV head's cache holds its own rows (slots (nheads_kv, n)): head h's part of place i is head h's row."""
    generator = torch.Generator().manual_seed(seed)
    capacity, nheads_kv = N_ROWS // 2, inputs.rows_source.shape[2]
    heads = nheads_kv if inputs.rows.dim() == 2 else 1
    cached = torch.stack([torch.randperm(N_ROWS, generator=generator)[:capacity] for _ in range(heads)]).to(DEVICE)
    slots = torch.full((heads, N_ROWS + 1), -1, dtype=torch.int32, device=DEVICE)
    slots.scatter_(1, cached, torch.arange(capacity, dtype=torch.int32, device=DEVICE).expand(heads, -1).contiguous())
    head_index = torch.arange(nheads_kv, device=DEVICE)
    cache_rows = torch.empty_like(inputs.rows_source[:capacity])  # laid out as the stored rows
    cache_rows.copy_(inputs.rows_source[cached.expand(nheads_kv, -1), :, head_index[:, None]].permute(1, 2, 0, 3))
    if poisoned:
        cache_rows = torch.randn(cache_rows.shape, generator=generator).to(cache_rows.dtype).to(DEVICE)
    budget = inputs.rows.shape[-1]
    cache_out = torch.zeros(budget, *inputs.rows_source.shape[1:], dtype=cache_rows.dtype, device=DEVICE)
    slots = slots[0] if inputs.rows.dim() == 1 else slots
    return dataclasses.replace(inputs, cache_slots=slots, cache_rows=cache_rows, cache_out=cache_out)


def stored_rows(inputs, rows):
    """The stored rows (n, 2, nheads_kv, headdim) of rows (n,) or, per head, (nheads_kv, n): head h's part of row i
    is head h's i-th row's."""
    nheads_kv = inputs.rows_source.shape[2]
    heads = torch.arange(nheads_kv, device=DEVICE)[:, None]
    return inputs.rows_source[rows.expand(nheads_kv, -1), :, heads].permute(1, 2, 0, 3)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_rows", "rows_per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_a_row_cache_of_copies_packs_the_same_and_passes_the_rows_on(case, dtype, per_head):
    inputs = make_inputs(*case, dtype, per_head=per_head)
    n_retrieved = int(inputs.n_retrieved)
    for pack in (pack_rotate_triton, pack_rotate_reference):  # each against itself: on a GPU the query's rotation
        expected = pack(inputs)  # by the kernel (fused multiply-adds) and by torch differ in the last bit
        cached = with_row_cache(inputs)
        got = pack(cached)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        stored = stored_rows(inputs, inputs.rows[..., :n_retrieved])
        assert torch.equal(cached.cache_out[:n_retrieved], stored)  # the rows as read, in the retrieved order


@pytest.mark.parametrize("per_head", [False, True], ids=["shared_rows", "rows_per_head"])
def test_cached_rows_are_read_from_the_cache(per_head):
    inputs = make_inputs(*CASES[3], torch.float32, per_head=per_head)
    got = pack_rotate_triton(with_row_cache(inputs, poisoned=True))
    poisoned = with_row_cache(inputs, poisoned=True)
    expected = pack_rotate_reference(poisoned)
    assert torch.equal(got.values, expected.values) and torch.equal(got.n_valid, expected.n_valid)
    for part in ("keys", "query"):  # rotated: in float32 the kernel's and torch's last bits may differ on a GPU
        assert torch.allclose(getattr(got, part), getattr(expected, part), atol=1e-5, rtol=1e-6), part
    n_sink, n_retrieved, nheads_kv = inputs.sink_keys.shape[1], int(inputs.n_retrieved), inputs.rows_source.shape[2]
    rows = inputs.rows[..., :n_retrieved].expand(nheads_kv, -1)  # (nheads_kv, n)
    slots = poisoned.cache_slots.expand(nheads_kv, -1).gather(1, rows).long()
    heads = torch.arange(nheads_kv, device=DEVICE)[:, None]
    cached_values = poisoned.cache_rows[slots.clamp(min=0), 1, heads]  # (nheads_kv, n, headdim)
    source = torch.where((slots >= 0)[..., None], cached_values, inputs.rows_source[rows, 1, heads])
    assert bool((slots >= 0).any()) and bool((slots < 0).any())  # both kinds of place in the case
    assert torch.equal(got.values[:, n_sink : n_sink + n_retrieved], source)


def test_a_row_cache_needs_its_three_tensors_and_slots_like_the_rows():
    inputs = make_inputs(*CASES[0], torch.float32)
    cached = with_row_cache(inputs)
    for broken, message in [
        (dataclasses.replace(cached, cache_out=None), "needs cache_slots, cache_rows and cache_out"),
        (dataclasses.replace(cached, rows=inputs.rows.expand(3, -1)), "cache_slots must be \\(3, n\\) int32 like"),
        (dataclasses.replace(cached, cache_slots=cached.cache_slots.long()), "cache_slots must be \\(n,\\) int32"),
        (dataclasses.replace(cached, cache_out=cached.cache_out[:-1]), "cache_out \\(37, 2, 3, 64\\)"),
        (dataclasses.replace(cached, cache_rows=cached.cache_rows.half()), "the stored rows' dtype"),
    ]:
        for pack in (pack_rotate_triton, pack_rotate_reference):
            with pytest.raises(ValueError, match=message):
                pack(broken)


def with_step_token(inputs, seed=2):
    """inputs with the step's own token given (key, value, position): pack_rotate writes it into the window, whose
    slot at window_length holds other values before (fresh copies of the window's buffers, which the packing writes)."""
    generator = torch.Generator().manual_seed(seed)
    nheads_kv, capacity, headdim = inputs.window_keys.shape
    dtype = inputs.window_keys.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    return dataclasses.replace(
        inputs, window_keys=inputs.window_keys.clone(), window_values=inputs.window_values.clone(),
        step_key=randn(nheads_kv, headdim), step_value=randn(nheads_kv, headdim),
        step_position=torch.tensor([12345], device=DEVICE),
        window_positions=torch.arange(capacity, device=DEVICE) * 7,
    )  # fmt: skip


@pytest.mark.parametrize("cached", [False, True], ids=["no_cache", "row_cache"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_the_steps_token_is_written_to_the_window_and_packed_as_if_it_were_there(case, dtype, cached):
    """With the step's token given, the kernel and the reference write it to the window's slot window_length (its
    position too) and pack what they pack when the window already holds it."""
    inputs = make_inputs(*case, dtype)
    if cached:
        inputs = with_row_cache(inputs)
    slot = int(inputs.window_length)
    for pack in (pack_rotate_triton, pack_rotate_reference):
        stepped = with_step_token(inputs)
        got = pack(stepped)
        held = dataclasses.replace(inputs, window_keys=stepped.window_keys.clone(),
                                   window_values=stepped.window_values.clone())  # fmt: skip
        expected = pack(held)  # the window's buffers as the step left them: the token at its slot
        assert torch.equal(got.values, expected.values) and torch.equal(got.n_valid, expected.n_valid)
        for part in ("keys", "query"):  # float32's rotation: the two builds may fuse other products (on a GPU)
            same = torch.equal if dtype != torch.float32 else functools.partial(torch.allclose, atol=1e-6, rtol=1e-6)
            assert same(getattr(got, part), getattr(expected, part)), part
        assert torch.equal(stepped.window_keys[:, slot], stepped.step_key)
        assert torch.equal(stepped.window_values[:, slot], stepped.step_value)
        others = torch.arange(inputs.window_keys.shape[1], device=DEVICE) != slot
        assert torch.equal(stepped.window_keys[:, others], inputs.window_keys[:, others])
        positions = torch.arange(inputs.window_keys.shape[1], device=DEVICE) * 7
        positions[slot] = 12345
        assert torch.equal(stepped.window_positions, positions)


def test_the_steps_token_needs_its_four_tensors_alike():
    inputs = with_step_token(make_inputs(*CASES[0], torch.float32))
    for broken, message in [
        (dataclasses.replace(inputs, window_positions=None), "needs step_key, step_value, step_position"),
        (dataclasses.replace(inputs, step_key=inputs.step_key[:1]), "must be \\(3, 64\\) in the window's dtype"),
        (dataclasses.replace(inputs, step_value=inputs.step_value.half()), "laid out alike, in one dtype"),
        (dataclasses.replace(inputs, window_positions=inputs.window_positions[:-1]), "must be \\(23,\\) int64"),
        (dataclasses.replace(inputs, step_position=inputs.step_position.int()), "must be \\(23,\\) int64"),
    ]:
        for pack in (pack_rotate_triton, pack_rotate_reference):
            with pytest.raises(ValueError, match=message):
                pack(broken)
