"""Chunk attention map kernel (span segmentation's input) against its torch reference in float64.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support), in float32 and float16; with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.chunk_attention_map import (  # noqa: E402
    MapTiles,
    chunk_attention_map,
    chunk_attention_map_reference,
    chunk_attention_map_triton,
)

# (nheads_kv, group, q_len, headdim): one token, sizes off the tiles, GQA groups 1, 3 (padded to 4), 4 and 8
CASES = [(1, 1, 1, 16), (2, 3, 37, 64), (2, 4, 130, 64), (1, 8, 70, 32), (3, 1, 200, 128)]


def make_inputs(nheads_kv, group, q_len, headdim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(nheads_kv * group, q_len, headdim, generator=generator) * 2
    keys = torch.randn(nheads_kv, q_len, headdim, generator=generator)
    return query.to(DEVICE, dtype), keys.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_float64_reference(case, dtype):
    query, keys = make_inputs(*case, dtype)
    scale = case[3] ** -0.5
    got = chunk_attention_map_triton(query, keys, scale)
    exact = chunk_attention_map_reference(query.double(), keys.double(), scale)
    plain = chunk_attention_map_reference(query, keys, scale)
    assert got.dtype == torch.float32 and got.shape == (case[0], case[2], case[2])
    kernel_error = (got.double() - exact.double()).abs().max().item()
    torch_error = (plain.double() - exact.double()).abs().max().item()
    assert kernel_error <= 2 * torch_error + 1e-6
    assert bool((got.triu(1) == 0).all())  # nothing above the diagonal
    assert torch.allclose(got.sum(dim=2), torch.ones(case[0], case[2], device=got.device), atol=1e-5)  # rows sum to 1


def test_keys_may_be_a_strided_slice_of_the_resident_set():
    query, keys = make_inputs(2, 4, 50, 64, torch.float32)
    resident = torch.randn(2, 30, 64, device=DEVICE)
    keys_in_place = torch.cat([resident, keys], dim=1)[:, 30:]  # head stride 80 * 64, not 50 * 64
    got = chunk_attention_map_triton(query, keys_in_place, 0.125)
    assert torch.allclose(got, chunk_attention_map_reference(query, keys, 0.125), atol=1e-6)


def test_dispatch_runs_the_kernel_here():
    query, keys = make_inputs(2, 3, 37, 64, torch.float32)
    assert torch.equal(chunk_attention_map(query, keys, 0.1), chunk_attention_map_triton(query, keys, 0.1))
    assert chunk_attention_map(query.double(), keys.double(), 0.1).dtype == torch.float32  # float64: the reference


def test_bad_inputs_get_one_sentence():
    query, keys = make_inputs(2, 3, 37, 64, torch.float32)
    for bad_query, bad_keys, message in [
        (query[:5], keys, "multiple of nheads_kv"),
        (query[:, :-1], keys, "q_len"),
        (query.half(), keys, "one of float32"),
        (query[..., :48], keys[..., :48], "power-of-two headdim"),
    ]:
        with pytest.raises(ValueError, match=message):
            chunk_attention_map_triton(bad_query, bad_keys, 0.1)


@pytest.mark.parametrize("tiles", [MapTiles(16, 32, 4), MapTiles(32, 64, 8), MapTiles(16, 128, 4)])
def test_every_launch_shape_gives_the_same_map(tiles):
    query, keys = make_inputs(2, 4, 130, 64, torch.float32)
    expected = chunk_attention_map_reference(query, keys, 0.125)
    assert torch.allclose(chunk_attention_map_triton(query, keys, 0.125, tiles), expected, atol=1e-6)
