"""LtriConfig's prefill chunk by device."""

import pytest

from ltri import LtriConfig, LtriError, MemoryConfig


def test_the_prefill_chunk_is_2048_on_cuda_and_1024_elsewhere_unless_given():
    assert LtriConfig().prefill_chunk("cuda") == 2048 and LtriConfig().prefill_chunk("cuda:1") == 2048
    assert LtriConfig().prefill_chunk("cpu") == 1024
    assert (
        LtriConfig(chunk_size=97).prefill_chunk("cuda") == 97 and LtriConfig(chunk_size=97).prefill_chunk("cpu") == 97
    )
    with pytest.raises(LtriError, match="chunk_size"):
        LtriConfig(chunk_size=0)


def test_the_other_fields_are_still_checked():
    with pytest.raises(LtriError, match="position mode"):
        LtriConfig(position_mode="sideways")
    with pytest.raises(LtriError, match="dtype"):
        LtriConfig(dtype="int8")


@pytest.mark.parametrize(
    "host_payloads, device, kept",
    [
        ("cuda", "cuda", True),
        ("cuda", "cuda:1", True),
        ("cuda", "cpu", False),
        ("always", "cpu", True),
        ("never", "cuda", False),
    ],
)
def test_host_rows_are_kept_where_host_payloads_says(host_payloads, device, kept):
    assert MemoryConfig(host_payloads=host_payloads).keeps_host_rows(device) is kept
