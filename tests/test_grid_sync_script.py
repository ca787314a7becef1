"""benchmarks/speed/grid_sync.py: its arithmetic on the CPU; on a GPU, that its barriers hold (every program read
each round's value of its neighbour); the timings themselves are for the GPU machine."""

import importlib.util
from pathlib import Path

import pytest
import torch
from support import load_script

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(SPEED))  # as when it runs as a script: it shares its neighbours' timing helpers
    return load_script("benchmarks/speed/grid_sync.py", "grid_sync_benchmark")


def test_the_expected_reads_and_the_slope(script):
    n, rounds = 5, 3
    by_hand = [sum((p + 1) % n + r for r in range(rounds)) for p in range(n)]
    assert script.expected_sums(n, rounds).tolist() == by_hand
    rows = [{"method": "barriers", "rounds": r, "ms": 0.01 + 0.002 * r} for r in (0, 1, 4, 16)]
    assert script.slope(rows, "barriers") == pytest.approx(0.002)


def test_it_refuses_to_run_without_a_gpu(script, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["grid_sync.py"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        script.main()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rounds", [1, 8])
def test_the_barriers_hold_on_the_gpu_and_the_launches_read_alike(script, rounds):
    barrier, step = script._kernels()
    n = torch.cuda.get_device_properties(0).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    values = torch.zeros(2 * n, dtype=torch.int32, device="cuda")
    out = torch.zeros(n, dtype=torch.int64, device="cuda")
    script.with_barriers(barrier, counter, values, out, rounds, 1_000_000)
    assert torch.equal(out.cpu(), script.expected_sums(n, rounds))
    assert counter.item() == rounds * n
    script.with_launches(step, counter, values, out, rounds)
    assert torch.equal(out.cpu(), script.expected_sums(n, rounds))
