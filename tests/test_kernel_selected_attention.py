"""The fused selected-token attention against a float64 reference, and against the unfused steps it replaces.

Without CUDA the Triton kernel runs in Triton's interpreter (see kernel_support): float32 and float16 there, bf16
on a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import use_triton  # noqa: E402
from ltri.kernels.pack_rotate import _rotate  # noqa: E402
from ltri.kernels.selected_attention import (  # noqa: E402
    selected_attention,
    selected_attention_reference,
    selected_attention_triton,
)
from ltri.kernels.sparse_attention import sparse_attention_reference  # noqa: E402

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (nheads_kv, group, n_res, n_src, n_sel, headdim)
CASES = [
    (1, 1, 97, 300, 123, 64),
    (3, 3, 123, 1025, 97, 128),
    (8, 4, 64 + 256, 3000, 1025, 128),
    (2, 4, 0, 500, 97, 64),
    (3, 1, 123, 200, 0, 128),
]


def rope(positions: torch.Tensor, headdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (len(positions), headdim), rotate-half layout."""
    inv_freq = 10000.0 ** (-torch.arange(0, headdim, 2, dtype=torch.float64) / headdim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def make_inputs(nheads_kv, group, n_res, n_src, n_sel, headdim, dtype, rows_dtype=torch.int64, seed=0):
    """The kernel's arguments in its order; rows distinct per head, unsorted, different for each head."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nheads_kv * group, headdim, generator=gen)
    k_res, v_res = (torch.randn(nheads_kv, n_res, headdim, generator=gen) for _ in range(2))
    k_src, v_src = (torch.randn(nheads_kv, n_src, headdim, generator=gen) * 1.5 for _ in range(2))
    rows = torch.stack([torch.randperm(n_src, generator=gen)[:n_sel] for _ in range(nheads_kv)]).to(rows_dtype)
    cos, sin = rope(torch.arange(n_sel) + 17, headdim)
    q_cos, q_sin = rope(torch.tensor([n_res + n_sel + 40]), headdim)
    floats = [t.to(DEVICE, dtype) for t in (q, q_cos[0], q_sin[0], k_res, v_res, k_src, v_src)]
    tables = [t.to(DEVICE, dtype) for t in (cos, sin)]
    return (*floats, rows.to(DEVICE), *tables)


def as_float64(args):
    return tuple(t if t.dtype in (torch.int32, torch.int64) else t.double() for t in args)


def plain_torch(args):
    """The unfused steps in the inputs' dtype: gather, rotate, concatenate, attend (softmax in float32)."""
    q, q_cos, q_sin, k_res, v_res, k_src, v_src, rows, cos, sin = args
    index = rows.long()[..., None].expand(-1, -1, q.shape[1])
    keys = torch.cat([k_res, _rotate(torch.gather(k_src, 1, index), cos, sin)], dim=1)
    values = torch.cat([v_res, torch.gather(v_src, 1, index)], dim=1)
    query = _rotate(q, q_cos, q_sin)[:, None]
    group = q.shape[0] // k_res.shape[0]
    scores = (query @ keys.repeat_interleave(group, 0).transpose(1, 2)).float() * q.shape[1] ** -0.5
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ values.repeat_interleave(group, 0), torch.logsumexp(scores, dim=-1)


def assert_close(got, plain, ref, atol, what):
    got, plain = got.double(), plain.double()
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{what}: -inf pattern differs"
    finite = torch.isfinite(ref)
    if not finite.any():
        return
    err = (got - ref)[finite].abs().max().item()
    err_torch = (plain - ref)[finite].abs().max().item()
    assert err <= 2 * err_torch + atol, f"{what}: kernel error {err:.3g}, plain torch {err_torch:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_a_float64_reference(case, dtype):
    args = make_inputs(*case, dtype)
    assert use_triton(args[0])
    out, lse = selected_attention(*args)
    ref_out, ref_lse = selected_attention_reference(*as_float64(args))
    plain_out, plain_lse = plain_torch(args)
    assert out.shape == (case[0] * case[1], 1, case[5]) and out.dtype == dtype
    assert lse.shape == (case[0] * case[1], 1) and lse.dtype == torch.float32
    assert_close(out, plain_out, ref_out, ATOL[dtype], "out")
    assert_close(lse, plain_lse, ref_lse, ATOL[dtype], "lse")


@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("split_size, select_split", [(None, None), (64, 128), (128, 200)])
def test_rows_dtypes_splits_and_the_second_merge_launch_agree(rows_dtype, fused_merge, split_size, select_split):
    case = (3, 4, 123, 700, 200, 64)
    args = make_inputs(*case, torch.float32, rows_dtype=rows_dtype, seed=1)
    out, lse = selected_attention_triton(*args, split_size=split_size, select_split=select_split,
                                         fused_merge=fused_merge)  # fmt: skip
    ref_out, ref_lse = selected_attention_reference(*as_float64(args))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_through_candidates_equal_the_rows_they_name(dtype):
    """rows as positions in candidates (a top-k over the candidates' scores) read candidates[rows]."""
    args = make_inputs(3, 4, 123, 700, 97, 128, dtype, seed=4)
    gen = torch.Generator().manual_seed(5)
    candidates = torch.randperm(700, generator=gen)[:300].to(DEVICE)
    positions = torch.stack([torch.randperm(300, generator=gen)[:97] for _ in range(3)]).to(DEVICE)
    direct = list(args)
    direct[7] = candidates[positions]
    through = list(args)
    through[7] = positions.to(torch.int32)
    out, lse = selected_attention(*through, candidates=candidates)
    want_out, want_lse = selected_attention(*direct)
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    ref_out, ref_lse = selected_attention_reference(*as_float64(through), candidates=candidates)
    assert_close(out, plain_torch(direct)[0], ref_out, ATOL[dtype], "out")
    assert_close(lse, plain_torch(direct)[1], ref_lse, ATOL[dtype], "lse")


def test_everything_selected_without_rotation_is_full_attention():
    """Identity RoPE (cos 1, sin 0), every source row selected in some order, no resident keys: full attention."""
    nheads_kv, group, n_src, headdim = 2, 3, 150, 64
    args = list(make_inputs(nheads_kv, group, 0, n_src, n_src, headdim, torch.float32, seed=2))
    for i in (1, 8):  # q_cos, cos
        args[i] = torch.ones_like(args[i])
    for i in (2, 9):  # q_sin, sin
        args[i] = torch.zeros_like(args[i])
    out, lse = selected_attention(*args)
    full_out, full_lse = sparse_attention_reference(args[0][:, None], args[5], args[6])
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_nothing_to_attend_gives_zero_and_minus_infinity():
    args = make_inputs(2, 2, 0, 10, 0, 64, torch.float32)
    out, lse = selected_attention(*args)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(7, a[7].float()), "rows must be an int32/int64"),
        (lambda a: a.__setitem__(7, a[7][0]), "rows must be an int32/int64"),
        (lambda a: a.__setitem__(8, a[8][:-1]), "cos and sin must be"),
        (lambda a: a.__setitem__(4, a[4][:, :-1]), "values shaped as their keys"),
        (lambda a: a.__setitem__(0, a[0][:-1]), "must be a multiple of nheads_kv"),
        (lambda a: a.__setitem__(3, a[3].double()), "one float dtype"),
    ],
)
def test_bad_inputs_get_one_clear_sentence(change, message):
    args = list(make_inputs(2, 2, 10, 40, 8, 64, torch.float32))
    change(args)
    with pytest.raises(ValueError, match=message):
        selected_attention(*args)


def test_candidates_must_be_one_dimensional_integers():
    args = make_inputs(2, 2, 10, 40, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="rows must be a 1-D int32/int64"):
        selected_attention(*args, candidates=torch.zeros(2, 8, dtype=torch.long, device=DEVICE))
