"""repeat_by_counts against torch.repeat_interleave."""

import pytest
import torch

from ltri.repeat import concatenated_ranges, repeat_by_counts


@pytest.mark.parametrize("n", [0, 1, 7, 2400])
@pytest.mark.parametrize("with_values", [True, False])
def test_repeats_each_value_by_its_count_as_torch_does(n, with_values):
    generator = torch.Generator().manual_seed(n)
    counts = torch.randint(0, 20, (n,), generator=generator)
    values = torch.randint(-1000, 1000, (n,), generator=generator) if with_values else None
    expected = torch.repeat_interleave(torch.arange(n) if values is None else values, counts)
    for total in (None, int(counts.sum())):
        got = repeat_by_counts(values, counts, total)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_keeps_the_values_dtype():
    values = torch.tensor([1.5, -2.0], dtype=torch.float32)
    assert torch.equal(repeat_by_counts(values, torch.tensor([2, 1])), torch.tensor([1.5, 1.5, -2.0]))


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_concatenated_ranges_list_each_range_in_order(n):
    generator = torch.Generator().manual_seed(n)
    starts = torch.randint(0, 10_000, (n,), generator=generator)
    counts = torch.randint(0, 20, (n,), generator=generator)
    expected = [
        position
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True)
        for position in range(start, start + count)
    ]
    assert concatenated_ranges(starts, counts, int(counts.sum())).tolist() == expected
