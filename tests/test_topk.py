"""Top-k with ties to the earlier place (ltri.topk); the two rounds on the GPU: tests/test_kernel_topk_select.py."""

from __future__ import annotations

import pytest
import torch

from ltri.topk import CHUNK, first_k_places, padded_width, topk_ties_to_first


def test_padded_widths_are_whole_chunks_past_one():
    assert [padded_width(n) for n in (0, 5, CHUNK, CHUNK + 1, 3 * CHUNK)] == [0, 5, CHUNK, 2 * CHUNK, 3 * CHUNK]


def test_a_row_with_fewer_finite_entries_than_k_gives_distinct_places_inside_it():
    n = 2 * CHUNK + 77
    values = torch.full((n,), float("-inf"))
    values[torch.tensor([3, 900, 1500, n - 1])] = torch.tensor([1.0, 4.0, 2.0, 3.0])
    top, places = topk_ties_to_first(values, 64)
    assert places[:4].tolist() == [900, n - 1, 1500, 3] and top[4:].eq(float("-inf")).all()
    assert places[4:].tolist() == [p for p in range(n) if p not in (3, 900, 1500, n - 1)][:60]  # -inf: earliest


@pytest.mark.parametrize("width", [40, CHUNK + 5, 3 * CHUNK])
def test_ties_go_to_the_earlier_place_whatever_the_width(width):
    """Layer 0's keys depend on the token alone, so a repeated token gives spans equal scores: the eager step's
    search (a table as wide as the spans) and a captured step's (every slot, padded) must keep the same ones."""
    values = torch.full((2, width), float("-inf"))
    values[:, :30] = torch.tensor([0.5, -0.25, 0.5, 0.0, -0.0, 0.5, -1.5, -0.25] * 3 + [2.0] * 6)
    top, places = topk_ties_to_first(values, 12)
    assert places[0].tolist() == [24, 25, 26, 27, 28, 29, 0, 2, 5, 8, 10, 13]
    assert torch.equal(top, values.topk(12, dim=-1).values) and torch.equal(places[0], places[1])
    order = sorted(range(30), key=lambda place: (-float(values[0, place]), place))[:20]
    assert topk_ties_to_first(values, 20)[1][0].tolist() == order


def test_first_places_ascend_and_an_empty_k_is_empty():
    values = torch.tensor([[0.5, 2.0, 0.5, 3.0, 2.0]])
    assert first_k_places(values, 3).tolist() == [[1, 3, 4]]
    assert first_k_places(values, 0).shape == (1, 0) and first_k_places(values, 9).tolist() == [[0, 1, 2, 3, 4]]
