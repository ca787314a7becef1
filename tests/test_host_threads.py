"""one_host_thread: one intra-op thread inside on CUDA, restored after; no change elsewhere."""

import pytest
import torch

from ltri.host_threads import one_host_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_a_cuda_forward_and_the_count_restored_after(two_threads):
    with one_host_thread("cuda:0"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"), one_host_thread(torch.device("cuda")):
        raise RuntimeError("an error inside")
    assert torch.get_num_threads() == 2


def test_a_cpu_forward_keeps_its_threads(two_threads):
    with one_host_thread("cpu"):
        assert torch.get_num_threads() == 2
