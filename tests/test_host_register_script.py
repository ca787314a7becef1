"""benchmarks/speed/host_register.py on the CPU: its bookkeeping with the CUDA calls recorded, and one sentence
where there is no GPU (the timings themselves need the GPU machine)."""

import pytest
import torch
from support import load_script


@pytest.fixture(scope="module")
def host_register():
    return load_script("benchmarks/speed/host_register.py", "host_register_benchmark")


class RecordingCudart:
    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, address, size, flags):  # noqa: N802 (CUDA's name)
        self.registered.append((address, size, flags))
        return 0

    def cudaHostUnregister(self, address):  # noqa: N802
        self.unregistered.append(address)
        return 0


@pytest.mark.parametrize("prefault", [False, True])
def test_pieces_register_in_order_and_are_all_released(host_register, monkeypatch, prefault):
    cudart = RecordingCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    pieces, timings = host_register.Pieces(4, 2 * 2**20), []
    host_register.register_pieces(pieces, prefault, timings)
    assert [address for address, _, _ in cudart.registered] == [pieces.piece(i) for i in range(4)]
    assert all(size == 2 * 2**20 and flags == 2 for _, size, flags in cudart.registered)
    assert len(timings) == 4 and all((t["prefault_ms"] is not None) == prefault for t in timings)
    pieces.release()
    assert cudart.unregistered == [pieces.piece(i) for i in range(4)] and pieces.registered == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the sentence is for machines without a GPU")
def test_without_a_gpu_it_says_so(host_register):
    with pytest.raises(SystemExit, match="CUDA GPU"):
        host_register.main(["--pieces", "1"])
