"""Budget rows kernel (the budget filled from the best votes, the chosen spans' rows) against a Python loop and
against its torch reference.

Without CUDA the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 for this module, see
kernel_support); with CUDA it runs compiled.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kernel_support import DEVICE, case_id, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.budget_rows import budget_rows, budget_rows_reference, budget_rows_triton  # noqa: E402

from ltri.topk import first_k_places  # noqa: E402

# (n_slots, m, budget, max_len): m candidates of n_slots (m <= budget); the last slot is an empty span
CASES = [(1, 1, 1, 1), (2, 1, 5, 4), (97, 16, 40, 12), (123, 64, 300, 16), (1025, 128, 512, 32), (300, 100, 100, 8)]


def make_votes(n_slots, max_len, seed=0):
    """Votes with ties (a few distinct values), -inf, -0.0 and 0.0; lengths 0..max_len, the last slot empty; the
    first rows of spans that tile the rows."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.tensor([float("-inf"), -0.0, 0.0, 0.25, 0.5, 1.0, 3.0])
    votes = levels[torch.randint(0, len(levels), (n_slots,), generator=generator)]
    votes = torch.where(torch.rand(n_slots, generator=generator) < 0.5, torch.rand(n_slots, generator=generator), votes)
    lengths = torch.randint(0, max_len + 1, (n_slots,), generator=generator)
    lengths[-1] = 0
    votes[-1] = float("-inf")
    first_rows = torch.cumsum(lengths, 0) - lengths
    return votes.to(DEVICE), lengths.to(DEVICE), first_rows.to(DEVICE)


def looped(votes, candidates, lengths, first_rows, budget):
    """The budget filled by a loop: candidates by decreasing vote, ties by slot, while they fit and are finite."""
    votes, lengths, first_rows = votes.tolist(), lengths.tolist(), first_rows.tolist()
    order = sorted(candidates.tolist(), key=lambda s: (-votes[s], s))
    taken, total = [], 0
    for slot in order:
        if votes[slot] == float("-inf") or total + lengths[slot] > budget:
            break
        taken.append(slot)
        total += lengths[slot]
    chosen = sorted(taken) + [len(votes)] * (len(order) - len(taken))
    rows = [first_rows[s] + j for s in sorted(taken) for j in range(lengths[s])]
    return chosen, rows + [0] * (budget - len(rows)), len(rows)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_and_reference_equal_a_loop(case, seed):
    n_slots, m, budget, max_len = case
    votes, lengths, first_rows = make_votes(n_slots, max_len, seed)
    candidates = first_k_places(votes, m)
    expected = looped(votes.cpu(), candidates.cpu(), lengths.cpu(), first_rows.cpu(), budget)
    for launch in (budget_rows_triton, budget_rows_reference):
        chosen, rows, count = launch(votes, candidates, lengths, first_rows, budget, max_len)
        assert (chosen.tolist(), rows.tolist(), int(count)) == expected
        chosen_only, no_rows, no_count = launch(votes, candidates, lengths, None, budget, max_len)
        assert chosen_only.tolist() == expected[0] and no_rows is None and no_count is None


def test_a_full_budget_and_the_dispatch():
    votes, lengths, first_rows = make_votes(50, 10, seed=3)
    lengths = torch.full_like(lengths, 4)
    candidates = first_k_places(votes, 8)
    chosen, rows, count = budget_rows(votes, candidates, lengths, first_rows, 16, 10)
    expected = looped(votes.cpu(), candidates.cpu(), lengths.cpu(), first_rows.cpu(), 16)
    assert (chosen.tolist(), rows.tolist(), int(count)) == expected and int(count) <= 16


def test_no_candidates_and_bad_input():
    votes, lengths, first_rows = make_votes(10, 4)
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    chosen, rows, count = budget_rows_triton(votes, none, lengths, first_rows, 6, 4)
    assert chosen.numel() == 0 and rows.tolist() == [0] * 6 and int(count) == 0
    with pytest.raises(ValueError, match="budget"):
        budget_rows(votes, first_k_places(votes, 8), lengths, first_rows, 4, 4)
    with pytest.raises(ValueError, match="float32"):
        budget_rows(votes.double(), first_k_places(votes, 2), lengths, first_rows, 4, 4)
    with pytest.raises(ValueError, match="tables"):
        budget_rows(votes, first_k_places(votes, 2), lengths[:5], first_rows, 4, 4)


def test_more_candidates_than_one_program_sorts_take_the_reference(monkeypatch):
    import ltri.kernels.budget_rows as module

    votes, lengths, first_rows = make_votes(97, 12)
    candidates = first_k_places(votes, 16)
    monkeypatch.setattr(module, "MAX_CANDIDATES", 8)
    monkeypatch.setattr(module, "budget_rows_triton", None)  # not called
    got = budget_rows(votes, candidates, lengths, first_rows, 40, 12)
    expected = looped(votes.cpu(), candidates.cpu(), lengths.cpu(), first_rows.cpu(), 40)
    assert (got[0].tolist(), got[1].tolist(), int(got[2])) == expected
