"""benchmarks/speed/read_floor.py: the read-only pass's kernel against its torch reference (Triton's interpreter
without CUDA), and attention.py's read_same_bytes rows on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, interpret_without_cuda  # noqa: E402, F401
from support import load_script  # noqa: E402

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


@pytest.fixture
def read_floor(monkeypatch):
    monkeypatch.syspath_prepend(str(SPEED))
    return load_script("benchmarks/speed/read_floor.py", "read_floor")


@pytest.mark.parametrize("n_words", [1, 97, 1025, 5000])
@pytest.mark.parametrize("shape_at", [0, 1, 3])
def test_each_program_sums_its_words_as_the_reference(read_floor, n_words, shape_at):
    shape = read_floor.READ_SHAPES[shape_at]
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, generator=generator).to(DEVICE)
    got = torch.empty(shape.n_programs(n_words), dtype=torch.int32, device=DEVICE)
    expected = torch.empty_like(got)
    read_floor.read_words_triton(words, shape, got)
    read_floor.read_words_reference(words, shape, expected)
    assert torch.equal(got, expected)
    chunk = shape.block * shape.iters  # the first program's sum by hand, wrapped to int32
    by_hand = sum(words[:chunk].tolist()) % 2**32
    assert got[0].item() % 2**32 == by_hand


def test_bad_words_are_refused(read_floor):
    shape = read_floor.READ_SHAPES[0]
    words = torch.zeros(10, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="words must be"):
        read_floor.read_words(words.float(), shape, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        read_floor.read_words(words, shape, torch.zeros(2, dtype=torch.int32, device=DEVICE))


def test_the_attention_sweep_reads_the_kernels_bytes(monkeypatch, read_floor):
    monkeypatch.syspath_prepend(str(SPEED))
    attention = load_script("benchmarks/speed/attention.py", "attention_benchmark")
    timer = attention.Timer(torch.device("cpu"), warmup=0, reps=1)
    kv_sets = [torch.randn(2, 2, 97, 16, dtype=torch.bfloat16) for _ in range(2)]
    n_bytes = kv_sets[0].numel() * 2
    rows = attention.read_rows(97, kv_sets, timer, 100.0, n_bytes)
    assert [row["method"] for row in rows] == [f"read_same_bytes[{read_floor.READ_SHAPES[0].label}]"]
    assert rows[0]["bytes"] == n_bytes and rows[0]["ms"] > 0 and rows[0]["layers_ms"] is None
