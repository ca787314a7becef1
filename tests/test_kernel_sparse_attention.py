"""Sparse attention kernel against a float64 reference: GQA, causal chunks, padding, split-K merge.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set for this module only),
so the kernel itself is checked on a CPU, in float32 and float16 (the interpreter computes float16 tiles in
float32: the half-precision tl.dot path is only checked on a GPU); with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels import use_triton  # noqa: E402
from ltri.kernels.sparse_attention import (  # noqa: E402
    Tiles,
    _tickets,
    merge_partial,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_triton,
)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (nheads_kv, group, q_len, n_keys, headdim, causal, variable n_valid)
CASES = [
    (1, 1, 1, 97, 64, False, False),
    (3, 3, 1, 123, 128, False, True),
    (8, 4, 1, 1025, 128, False, True),
    (2, 4, 37, 123, 64, True, True),
    (3, 3, 37, 123, 128, True, False),
    (1, 1, 37, 97, 128, True, True),
]


def make_inputs(nheads_kv, group, q_len, n_keys, headdim, ragged, dtype, seed=0):
    """q (nheads, q_len, headdim), k, v (nheads_kv, n_keys, headdim), n_valid (nheads_kv,) or None."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nheads_kv * group, q_len, headdim, generator=gen)
    k = torch.randn(nheads_kv, n_keys, headdim, generator=gen)
    v = torch.randn(nheads_kv, n_keys, headdim, generator=gen)
    n_valid = torch.randint(q_len, n_keys + 1, (nheads_kv,), generator=gen) if ragged else None
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    return q, k, v, None if n_valid is None else n_valid.to(DEVICE)


def plain_torch(q, k, v, n_valid, causal):
    """Attention the obvious way in the inputs' precision (matmuls in dtype, softmax in float32)."""
    nheads, q_len, headdim = q.shape
    nheads_kv, n_keys, _ = k.shape
    group = nheads // nheads_kv
    scores = (q @ k.repeat_interleave(group, 0).transpose(1, 2)) * (1.0 / math.sqrt(headdim))
    n_kv = torch.full((nheads_kv,), n_keys, device=q.device) if n_valid is None else n_valid
    limit = n_kv[:, None].expand(nheads_kv, q_len)
    if causal:
        limit = limit - q_len + 1 + torch.arange(q_len, device=q.device)
    mask = (torch.arange(n_keys, device=q.device) < limit[..., None]).repeat_interleave(group, 0)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return probs @ v.repeat_interleave(group, 0), torch.logsumexp(scores, dim=-1)


def assert_close_to_reference(got, plain, ref, atol, what):
    """Error of got against ref (float64) at most twice the plain-torch error plus atol."""
    got, plain = got.double(), plain.double()
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{what}: -inf pattern differs"
    finite = torch.isfinite(ref)
    err = (got - ref)[finite].abs().max().item()
    err_torch = (plain - ref)[finite].abs().max().item()
    assert err <= 2 * err_torch + atol, f"{what}: kernel error {err:.3g}, plain torch {err_torch:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-g{}-q{}-n{}-d{}-{}-{}".format(*c))
def test_matches_float64_reference(case, dtype):
    nheads_kv, group, q_len, n_keys, headdim, causal, ragged = case
    q, k, v, n_valid = make_inputs(nheads_kv, group, q_len, n_keys, headdim, ragged, dtype)
    assert use_triton(q, k, v), "the test must exercise the Triton kernel"
    out, lse = sparse_attention(q, k, v, n_valid, causal=causal)
    ref_out, ref_lse = sparse_attention_reference(q.double(), k.double(), v.double(), n_valid, causal)
    plain_out, plain_lse = plain_torch(q, k, v, n_valid, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert_close_to_reference(out, plain_out, ref_out, ATOL[dtype], "out")
    assert_close_to_reference(lse, plain_lse, ref_lse.double(), 1e-4, "lse")


@pytest.mark.parametrize("fused_merge", [True, False], ids=["fused", "two-launches"])
@pytest.mark.parametrize(("split_size", "q_len"), [(64, 1), (192, 1), (128, 37)])
def test_many_splits_merge_exactly(split_size, q_len, fused_merge):
    """Split-K with many splits (some entirely past n_valid) gives the reference answer, decode and causal."""
    causal = q_len > 1
    q, k, v, n_valid = make_inputs(3, 4, q_len, 1025, 64, True, torch.float32, seed=1)
    n_valid[0] = 130  # most splits of head 0 see no key
    out, lse = sparse_attention_triton(q, k, v, n_valid, causal=causal, split_size=split_size, fused_merge=fused_merge)
    ref_out, ref_lse = sparse_attention_reference(q.double(), k.double(), v.double(), n_valid, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["decode", "causal"])
def test_merge_partial_of_two_halves_is_the_whole(causal):
    """Attention over keys [0, m) and [m, n) merged by lse equals attention over [0, n)."""
    q_len = 5 if causal else 1
    q, k, v, n_valid = make_inputs(2, 3, q_len, 123, 64, True, torch.float32, seed=2)
    m = 60
    if causal:  # every query sees all of the first half, the causal mask acts in the second
        n_valid = n_valid.clamp(min=m + q_len)
    else:
        n_valid[1] = 40  # head 1 has no valid key in the second half
    first = sparse_attention(q, k[:, :m], v[:, :m], n_valid.clamp(max=m))
    second = sparse_attention(q, k[:, m:], v[:, m:], (n_valid - m).clamp(min=0), causal=causal)
    whole = sparse_attention(q, k, v, n_valid, causal=causal)
    merged = merge_partial([first[0], second[0]], [first[1], second[1]])
    torch.testing.assert_close(merged[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], whole[1], atol=1e-5, rtol=1e-6)


def test_head_without_valid_keys_gives_zero_and_minus_inf():
    q, k, v, _ = make_inputs(2, 2, 1, 97, 64, False, torch.float32, seed=3)
    n_valid = torch.tensor([0, 97], device=DEVICE)
    out, lse = sparse_attention(q, k, v, n_valid)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == float("-inf"))
    ref_out, ref_lse = sparse_attention_reference(q, k, v, n_valid)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse)


def check_against_reference(q, k, v, n_valid, causal, split_size, **launch):
    """sparse_attention_triton with split_size (and launch's options) against the float64 reference (float32)."""
    out, lse = sparse_attention_triton(q, k, v, n_valid, causal=causal, split_size=split_size, **launch)
    ref_out, ref_lse = sparse_attention_reference(q.double(), k.double(), v.double(), n_valid, causal)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


# (nheads_kv, group, q_len, n_keys, headdim, causal, split_size): one split, several, more than a merge step's 16
LAUNCHES = [
    (3, 4, 1, 1025, 64, False, 32),
    (2, 3, 37, 123, 128, True, 64),
    (8, 4, 1, 300, 64, False, 1024),
    (1, 1, 1, 1025, 256, False, 32),
]


@pytest.mark.parametrize("fused_merge", [True, False], ids=["fused", "two-launches"])
@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 2), (2, 3), (3, 0)], ids=lambda i: f"launch{i}")
def test_consecutive_launches_with_other_shapes_and_split_counts(first, second, fused_merge):
    """Launches with other shapes and split counts one after another (compiled variants and buffers do not leak)."""
    for index in (first, second, first):
        nheads_kv, group, q_len, n_keys, headdim, causal, split_size = LAUNCHES[index]
        q, k, v, n_valid = make_inputs(nheads_kv, group, q_len, n_keys, headdim, True, torch.float32, seed=index)
        check_against_reference(q, k, v, n_valid, causal, split_size, fused_merge=fused_merge)
    assert not _tickets(q.device, 1).any(), "every fused merge leaves its ticket at 0 for the next launch"


@pytest.mark.parametrize("fused_merge", [True, False], ids=["fused", "two-launches"])
@pytest.mark.parametrize("tiles", [Tiles(16, 32, 4, 3), Tiles(32, 128, 8, 1), Tiles(16, 16, 2, 4)], ids=str)
def test_other_tiles_and_both_merges(tiles, fused_merge):
    """Launch shapes a sweep may pick: other key blocks, warps and stages; rows over several row blocks."""
    for q_len, causal in ((1, False), (21, True)):
        q, k, v, n_valid = make_inputs(3, 4, q_len, 300, 64, True, torch.float32, seed=7)
        check_against_reference(q, k, v, n_valid, causal, 64, tiles=tiles, fused_merge=fused_merge)


@pytest.mark.parametrize("headdim", [64, 256])
@pytest.mark.parametrize(("split_size", "q_len"), [(32, 1), (32, 37), (2048, 1), (2048, 37)])
def test_smallest_splits_and_a_single_split(split_size, q_len, headdim):
    """The most splits split_size allows (33, beyond one merge step of 16 splits) and a single split."""
    q, k, v, n_valid = make_inputs(2, 4, q_len, 1025, headdim, True, torch.float32, seed=5)
    n_valid[0] = 1000
    check_against_reference(q, k, v, n_valid, q_len > 1, split_size)


@pytest.mark.parametrize("fused_merge", [True, False], ids=["fused", "two-launches"])
@pytest.mark.parametrize("causal", [False, True], ids=["decode", "causal"])
@pytest.mark.parametrize("split_size", [32, 2048], ids=["splits", "one-split"])
def test_rows_without_keys_give_zero_and_minus_inf(split_size, causal, fused_merge):
    """A KV head with no valid key (all its rows), and causal rows before the first valid key."""
    q_len = 5 if causal else 1
    q, k, v, _ = make_inputs(3, 2, q_len, 200, 64, False, torch.float32, seed=6)
    n_valid = torch.tensor([0, 200, 3], device=DEVICE)  # KV head 2, causal: positions 0 and 1 see no key
    out, lse = sparse_attention_triton(q, k, v, n_valid, causal=causal, split_size=split_size, fused_merge=fused_merge)
    empty = torch.zeros(q.shape[:2], dtype=torch.bool, device=DEVICE)
    empty[:2] = True
    if causal:
        empty[4:, :2] = True
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))
    assert torch.all(torch.isfinite(lse[~empty]))
    check_against_reference(q, k, v, n_valid, causal, split_size, fused_merge=fused_merge)


def test_strided_keys_and_explicit_scale():
    """k, v as views with a row stride (e.g. slots of a larger buffer); a custom scale."""
    q, k, v, _ = make_inputs(2, 2, 1, 194, 64, False, torch.float32, seed=4)
    k, v = k[:, ::2], v[:, 1::2]
    out, lse = sparse_attention(q, k, v, scale=0.3)
    ref_out, ref_lse = sparse_attention_reference(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-6)


def test_clear_errors():
    q, k, v, _ = make_inputs(2, 2, 1, 97, 64, False, torch.float32)
    with pytest.raises(ValueError, match="multiple of nheads_kv"):
        sparse_attention(q[:3], k, v)
    with pytest.raises(ValueError, match="same shape"):
        sparse_attention(q, k, v[:, :50])
    with pytest.raises(ValueError, match="n_valid"):
        sparse_attention(q, k, v, torch.tensor([1.0, 2.0], device=DEVICE))
    with pytest.raises(ValueError, match="one dtype"):
        sparse_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="power-of-2"):
        sparse_attention(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="contiguous"):
        sparse_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v)


def test_model_side_import_and_cpu_call_never_import_triton():
    """Model code imports ltri.kernels freely: on CPU tensors (no TRITON_INTERPRET) the references run."""
    code = (
        "import sys, torch, ltri\n"
        "before = 'triton' in sys.modules  # whatever the rest of ltri imports\n"
        "from ltri.kernels import lowrank_scores, sparq_scores, sparse_attention, topk_select\n"
        "q, k = torch.randn(4, 1, 64), torch.randn(2, 50, 64)\n"
        "sparse_attention.sparse_attention(q, k, k)\n"
        "sparq_scores.sparq_scores(q[:, 0], k, 8)\n"
        "assert before or 'triton' not in sys.modules\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("implementation", [sparse_attention_reference, sparse_attention_triton])
def test_padding_past_n_valid_may_hold_anything(implementation):
    """A captured decode step packs its keys into buffers whose tail is whatever memory held: NaN included."""
    q, k, v, _ = make_inputs(2, 4, 1, 97, 64, False, torch.float32)
    n_valid = torch.tensor([40, 97], device=DEVICE)
    clean, _ = implementation(q, k, v, n_valid=n_valid)
    k[0, 40:], v[0, 40:] = float("nan"), float("inf")
    dirty, _ = implementation(q, k, v, n_valid=n_valid)
    assert torch.equal(clean, dirty)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused_merge", [True, False], ids=["fused", "two-launches"])
def test_replays_of_a_captured_launch_match_eager_calls(fused_merge):
    """A captured decode step replays the launch many times: the fused merge's tickets must be back at 0 each time."""
    q, k, v, n_valid = make_inputs(8, 4, 1, 1025, 128, True, torch.bfloat16, seed=8)
    expected = sparse_attention_triton(q, k, v, n_valid, split_size=64, fused_merge=fused_merge)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparse_attention_triton(q, k, v, n_valid, split_size=64, fused_merge=fused_merge)
    for _ in range(5):
        captured[0].zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured[0], expected[0], atol=0, rtol=0)
        torch.testing.assert_close(captured[1], expected[1], atol=0, rtol=0)
    assert not _tickets(q.device, 1).any()
