"""Row cache slots kernel (``kernels/cache_slots.py``) against a Python model of the cache over a run of steps, and
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

from kernel_support import DEVICE, interpret_without_cuda  # noqa: E402, F401
from ltri.kernels.cache_slots import refresh_slots, refresh_slots_reference, refresh_slots_triton  # noqa: E402

# (stored rows, budget): a budget past one loop step of the kernel (1024 rows) too
CASES = [(10, 1), (97, 16), (500, 64), (3000, 1500)]


def steps(n_rows, budget, n_steps=6, seed=0):
    """Each step's retrieved rows (budget,), distinct and ascending, 0 past their count, and the count: runs of rows
    that overlap from one step to the next (as consecutive decode steps retrieve), one step retrieving nothing."""
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(n_rows, generator=generator)[: budget // 2]
    for step in range(n_steps):
        fresh = torch.randperm(n_rows, generator=generator)[:budget]
        chosen = torch.unique(torch.cat([kept, fresh]))[:budget] if step != 3 else torch.zeros(0, dtype=torch.long)
        chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[: int(0.8 * budget) + 1]].sort().values
        kept = chosen[: budget // 2]
        rows = torch.zeros(budget, dtype=torch.long)
        rows[: chosen.numel()] = chosen
        yield rows.to(DEVICE), torch.tensor(chosen.numel(), device=DEVICE)


def steps_by_head(n_rows, budget, heads):
    """Each step's rows (budget,) for one cache (heads None) or (heads, budget), each head's own run (seeded apart),
    and the count they share: a token selection keeps as many rows in every head."""
    if heads is None:
        yield from steps(n_rows, budget)
        return
    runs = [list(steps(n_rows, budget, seed=head)) for head in range(heads)]
    for per_head in zip(*runs, strict=True):
        n_retrieved = min(int(n) for _, n in per_head)
        rows = torch.stack([torch.where(torch.arange(budget, device=DEVICE) < n_retrieved, r, 0) for r, _ in per_head])
        yield rows, torch.tensor(n_retrieved, device=DEVICE)


@pytest.mark.parametrize("heads", [None, 3], ids=["shared", "per_head"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-{case[1]}")
@pytest.mark.parametrize("refresh", [refresh_slots_triton, refresh_slots_reference], ids=["kernel", "reference"])
def test_slots_name_the_last_steps_rows_at_their_places(case, refresh, heads):
    n_rows, budget = case
    prefix = () if heads is None else (heads,)
    slots = torch.full((*prefix, n_rows + 1), -1, dtype=torch.int32, device=DEVICE)
    held = torch.zeros(*prefix, budget, dtype=torch.long, device=DEVICE)
    count = torch.zeros(heads or 1, dtype=torch.long, device=DEVICE)
    hits = torch.zeros(2, dtype=torch.long, device=DEVICE)
    held_before, expected_hits = [set() for _ in range(heads or 1)], [0, 0]
    for rows, n_retrieved in steps_by_head(n_rows, budget, heads):
        refresh(slots, held, count, rows, n_retrieved, hits)
        by_head = zip(slots.view(-1, n_rows + 1), rows.view(-1, budget), strict=True)
        for head, (head_slots, head_rows) in enumerate(by_head):
            retrieved = head_rows[: int(n_retrieved)].tolist()
            expected = [-1] * n_rows
            for place, row in enumerate(retrieved):
                expected[row] = place
            assert head_slots[:n_rows].tolist() == expected
            expected_hits = [expected_hits[0] + len(held_before[head] & set(retrieved)),
                             expected_hits[1] + len(retrieved)]  # fmt: skip
            held_before[head] = set(retrieved)
        assert held.tolist() == rows.tolist() and count.tolist() == [int(n_retrieved)] * (heads or 1)
        assert hits.tolist() == expected_hits
    assert budget == 1 or 0 < expected_hits[0] < expected_hits[1]  # the steps overlap, not wholly


def test_dispatch_and_bad_input():
    slots = torch.full((11,), -1, dtype=torch.int32, device=DEVICE)
    held, count = torch.zeros(4, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    hits = torch.zeros(2, dtype=torch.long, device=DEVICE)
    rows = torch.tensor([2, 5, 7, 0], device=DEVICE)
    refresh_slots(slots, held, count, rows, torch.tensor(3, device=DEVICE), hits)
    assert slots[:10].tolist() == [-1, -1, 0, -1, -1, 1, -1, 2, -1, -1] and hits.tolist() == [0, 3]
    refresh_slots(slots, held, count, torch.tensor([0, 5, 9, 0], device=DEVICE), torch.tensor(3, device=DEVICE), hits)
    assert slots[:10].tolist() == [0, -1, -1, -1, -1, 1, -1, -1, -1, 2] and hits.tolist() == [1, 6]
    with pytest.raises(ValueError, match="slots must be"):
        refresh_slots(slots.long(), held, count, rows, torch.tensor(3, device=DEVICE), hits)
    with pytest.raises(ValueError, match="fewer than the 5 retrieved"):
        refresh_slots(slots, held, count, torch.arange(5, device=DEVICE), torch.tensor(3, device=DEVICE), hits)
    with pytest.raises(ValueError, match="hits must be"):
        refresh_slots(slots, held, count, rows, torch.tensor(3, device=DEVICE), hits.int())
    per_head = slots.expand(2, -1).contiguous(), held.expand(2, -1).contiguous(), count.expand(2).contiguous()
    with pytest.raises(ValueError, match="held and rows must be \\(2, n\\) like the slots"):
        refresh_slots(*per_head, rows, torch.tensor(3, device=DEVICE), hits)
    with pytest.raises(ValueError, match="one int64 a head"):
        refresh_slots(*per_head[:2], count, rows.expand(2, -1).contiguous(), torch.tensor(3, device=DEVICE), hits)
