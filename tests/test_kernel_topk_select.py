"""Top-k selection kernel against its torch reference (a stable sort) and against torch.topk's values.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA it runs compiled, bf16 included.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, DTYPES, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.topk_select import (  # noqa: E402
    _MAX_BLOCK,
    RADIX_BITS,
    parts_per_row,
    topk_found_reference,
    topk_found_triton,
    topk_tokens,
    topk_tokens_reference,
    topk_tokens_triton,
)

from ltri.topk import first_k_found, topk_ties_to_first  # noqa: E402

CHUNK = 4096  # one program's block of entries: longer rows go in two launches (parts, then the row)

# (n_rows, n_keys, k): awkward lengths, k of 1 to all, rows longer than a chunk read in chunks by one program
# (k too large for parts), and long rows in two stages (parts_per_row > 1: 7 and 3 parts)
CASES = [(1, 97, 5), (3, 123, 123), (8, 1025, 64), (1, 4032, 63), (2, _MAX_BLOCK + 904, 1000), (8, 128, 32), (4, 16, 1),
         (1, 3 * _MAX_BLOCK + 5, 64), (3, _MAX_BLOCK + 904, 500)]  # fmt: skip
TWO_STAGE_CASES = [case for case in CASES if parts_per_row(case[1], case[2]) > 1]


def random_scores(n_rows, n_keys, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n_keys, generator=generator).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference_and_torch_topk(case, dtype):
    n_rows, n_keys, k = case
    scores = random_scores(n_rows, n_keys, dtype)
    indices = topk_tokens_triton(scores, k)
    assert indices.dtype == torch.long and indices.shape == (n_rows, k)
    assert torch.equal(indices, topk_tokens_reference(scores, k))
    assert torch.all(indices[:, 1:] > indices[:, :-1]), "indices must be strictly ascending"
    best = torch.topk(scores.float(), k, dim=1).values.sort(dim=1).values
    assert torch.equal(scores.float().gather(1, indices).sort(dim=1).values, best)


@pytest.mark.parametrize("radix_bits", sorted({0, 4, 8} - {RADIX_BITS}))
@pytest.mark.parametrize("case", [(3, 123, 40), (8, 1025, 64), (1, 3 * _MAX_BLOCK + 5, 64), (2, _MAX_BLOCK + 9, 999)])
def test_every_threshold_search_chooses_the_same(case, radix_bits):
    """The binary search and the radix searches (the default tested above) choose alike, ties and -0.0 included,
    on one chunk, in two stages and on rows read in chunks; with fewer warps too."""
    n_rows, n_keys, k = case
    scores = random_scores(n_rows, n_keys, torch.float16, seed=4)  # half precision: many ties
    scores[:, ::7] = -0.0
    expected = topk_tokens_reference(scores, k)
    assert torch.equal(topk_tokens_triton(scores, k, radix_bits=radix_bits), expected)
    assert torch.equal(topk_tokens_triton(scores, k, radix_bits=radix_bits, num_warps=2), expected)


@pytest.mark.parametrize("n_valid", [[0, 10, 300], [300, 300, 300], [1, 299, 57]])
def test_padding_ranks_below_every_valid_key(n_valid):
    scores = random_scores(3, 300, torch.float32, seed=1)
    scores[:, 250:] = 100.0  # padding with the best scores must still lose
    valid = torch.tensor(n_valid, device=DEVICE)
    indices = topk_tokens_triton(scores, 120, valid)
    assert torch.equal(indices, topk_tokens_reference(scores, 120, valid))
    for row, count in enumerate(n_valid):
        kept = min(count, 120)
        assert torch.all(indices[row, :kept] < count) and torch.all(indices[row, kept:] >= count)


def test_long_rows_split_only_where_every_part_holds_k():
    assert [parts_per_row(case[1], case[2]) for case in TWO_STAGE_CASES] == [7, 3]
    assert parts_per_row(_MAX_BLOCK, 8) == 1  # one chunk: one stage
    assert parts_per_row(_MAX_BLOCK + 904, 1000) == 1  # the candidates would be more than half the row
    assert parts_per_row(16384, 64) == 8  # 64 of 16K span votes (512K tokens)


@pytest.mark.parametrize("case", TWO_STAGE_CASES)
def test_two_stages_keep_ties_padding_and_infinities_as_one(case):
    n_rows, n_keys, k = case
    scores = torch.zeros(n_rows, n_keys, device=DEVICE)
    scores[:, n_keys // 2 : n_keys // 2 + k // 3] = 1.0  # a few winners in a middle part, the rest tied zeros
    scores[:, -7:] = float("-inf")
    assert torch.equal(topk_tokens_triton(scores, k), topk_tokens_reference(scores, k))
    ties = torch.full((n_rows, n_keys), float("-inf"), device=DEVICE)
    ties[:, -3:] = 2.0  # k - 3 of the -inf ties: the lowest indices, across the parts' candidates
    assert torch.equal(topk_tokens_triton(ties, k), topk_tokens_reference(ties, k))
    random = random_scores(n_rows, n_keys, torch.float32, seed=5)
    random[:, n_keys - 50 :] = 100.0  # best scores in padding must lose, in the last part
    valid = torch.tensor([n_keys - 50, k // 2, n_keys // 3][:n_rows], device=DEVICE)  # fewer valid than k too
    indices = topk_tokens_triton(random, k, valid)
    assert torch.equal(indices, topk_tokens_reference(random, k, valid))


def test_ties_go_to_the_lowest_indices():
    scores = torch.zeros(2, 200, device=DEVICE)
    scores[0, 150:] = 1.0  # 50 clear winners, then 30 of the 150 tied zeros: indices 0..29
    indices = topk_tokens_triton(scores, 80)
    expected = torch.cat([torch.arange(30), torch.arange(150, 200)]).to(DEVICE)
    assert torch.equal(indices[0], expected)
    assert torch.equal(indices[1], torch.arange(80, device=DEVICE))


def test_infinities_and_signed_values_keep_their_order():
    values = [float("-inf"), -3.5, -1e-30, -0.0, 0.5, 1e30, float("inf")]
    scores = torch.tensor([values[::-1] + values], device=DEVICE)  # each value twice, descending then ascending
    for k in range(1, scores.shape[1] + 1):
        assert torch.equal(topk_tokens_triton(scores, k), topk_tokens_reference(scores, k)), k


def test_strided_rows_and_empty_selections():
    scores = random_scores(6, 300, torch.float32, seed=2)[::2, ::1]  # rows 600 apart: not contiguous
    assert torch.equal(topk_tokens_triton(scores, 17), topk_tokens_reference(scores, 17))
    assert topk_tokens_triton(scores, 0).shape == (3, 0)
    column_major = random_scores(40, 5, torch.float32, seed=3).t()  # stride(1) != 1: copied first
    assert torch.equal(topk_tokens_triton(column_major, 7), topk_tokens_reference(column_major, 7))


def test_dispatch_takes_the_reference_for_float64():
    scores = torch.zeros(1, 50, dtype=torch.float64, device=DEVICE)
    scores[0, :3] = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12], dtype=torch.float64)  # tied in float32
    assert topk_tokens(scores, 2).tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "scores, k, n_valid, message",
    [
        (torch.zeros(4), 1, None, "must be \\(nheads_kv, n_keys\\)"),
        (torch.zeros(2, 5), 6, None, "k must be between 0 and n_keys"),
        (torch.zeros(2, 5), -1, None, "k must be between 0 and n_keys"),
        (torch.zeros(2, 5), 2, torch.tensor([1, 2, 3]), "n_valid must have shape"),
    ],
)
def test_bad_inputs_get_one_sentence(scores, k, n_valid, message):
    for select in (topk_tokens_triton, topk_tokens_reference):
        with pytest.raises(ValueError, match=message):
            select(scores.to(DEVICE), k, n_valid)


def test_an_unknown_radix_gets_one_sentence():
    with pytest.raises(ValueError, match="radix_bits must be 0, 4 or 8"):
        topk_tokens_triton(torch.zeros(2, 5, device=DEVICE), 2, radix_bits=5)


@pytest.mark.parametrize("width", [CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 904])
@pytest.mark.parametrize("k", [1, 64, CHUNK // 4])
def test_long_rows_in_two_launches_give_the_places_of_one_stable_sort(width, k):
    """Rows longer than a chunk (the span search's table, the votes of a long text: ``ltri.topk.first_k_places`` on
    the GPU) take two launches: the same places as one stable descending sort, ties (repeated values, -0.0 and 0.0,
    -inf) to the earlier place."""
    generator = torch.Generator().manual_seed(width + k)
    values = torch.randint(-20, 20, (3, width), generator=generator).float() / 4  # many ties
    values[0, : width // 2] = float("-inf")  # fewer finite entries than k in some chunks
    values[1, ::7] = -0.0
    values[2, CHUNK - 50 : CHUNK + 50] = 100.0  # ties straddling a chunk's end
    values = values.to(DEVICE)
    places = topk_tokens_triton(values, k)  # the kernel (interpreted without CUDA)
    assert torch.equal(places.cpu(), topk_tokens_reference(values.cpu() + 0.0, k))


def test_ties_to_first_are_the_same_places_in_a_padded_table():
    """A captured step scores every slot (-inf past the spans): the same spans as the eager step's narrower table."""
    values = torch.full((2, CHUNK + 300), float("-inf"))
    values[:, :40] = torch.tensor([0.5, -0.25, 0.5, 0.0, -0.0] * 8)
    narrow = topk_ties_to_first(values[:, :40].to(DEVICE), 12)
    padded = topk_ties_to_first(values.to(DEVICE), 12)
    assert torch.equal(narrow[1], padded[1]) and torch.equal(narrow[0], padded[0])
    assert narrow[1][0].tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(8, 1025, 64), (1, 4032, 63), (3, 2 * CHUNK + 904, 64), (4, 16, 16)])
def test_found_gives_the_places_their_scores_and_minus_one_where_nothing_was(case, dtype):
    """topk_found (a captured search's top-k): topk_tokens' places, their scores as float32, and -1 for a place whose
    score is -inf (a row with fewer finite entries than k), in one stage and in two."""
    n_rows, n_keys, k = case
    scores = random_scores(n_rows, n_keys, dtype, seed=5)
    scores[-1, ::3] = -0.0
    scores[0, k // 2 :] = float("-inf")  # the first row finds only k // 2
    values, places = topk_found_triton(scores, k)
    expected_values, expected_places = topk_found_reference(scores.cpu(), k)
    assert values.dtype == torch.float32 and torch.equal(places.cpu(), expected_places)
    assert torch.equal(values.cpu(), expected_values + 0.0)  # -0.0 may come as 0.0
    assert (places[0] == -1).sum().item() == k - k // 2
    assert torch.equal(places[1:].cpu(), topk_tokens_reference(scores[1:].cpu(), k))


def test_first_k_found_names_missing_places_and_takes_lead_dimensions():
    values = torch.full((2, 3, 50), float("-inf"))
    values[:, :, :4] = torch.tensor([0.5, 2.0, -1.0, 2.0])
    top, places = first_k_found(values.to(DEVICE), 6)
    assert top.shape == places.shape == (2, 3, 6)
    assert places[0, 0].tolist() == [0, 1, 2, 3, -1, -1]
    assert top[1, 2, :4].tolist() == [0.5, 2.0, -1.0, 2.0]
    empty_top, empty_places = first_k_found(values[:, :, :0].to(DEVICE), 6)
    assert empty_top.shape == empty_places.shape == (2, 3, 0)
