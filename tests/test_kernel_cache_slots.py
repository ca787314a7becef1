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


@pytest.mark.parametrize("n_segments", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-{case[1]}")
@pytest.mark.parametrize("refresh", [refresh_slots_triton, refresh_slots_reference], ids=["kernel", "reference"])
def test_slots_name_the_last_steps_rows_at_their_places(case, refresh, n_segments):
    """Against a Python model: each step's rows go to the segment of the oldest step held, at their places there;
    a row keeps the place of the newest step that retrieved it; the hits count the rows some slot named."""
    n_rows, budget = case
    slots = torch.full((n_rows + 1,), -1, dtype=torch.int32, device=DEVICE)
    held = torch.zeros(n_segments, budget, dtype=torch.long, device=DEVICE)
    counts = torch.zeros(n_segments, dtype=torch.long, device=DEVICE)
    turn = torch.zeros(1, dtype=torch.long, device=DEVICE)
    hits = torch.zeros(2, dtype=torch.long, device=DEVICE)
    place_of, expected_hits = {}, [0, 0]  # row -> its place in the cache
    for step, (rows, n_retrieved) in enumerate(steps(n_rows, budget, n_steps=8)):
        refresh(slots, held, counts, turn, rows, n_retrieved, hits)
        retrieved = rows[: int(n_retrieved)].tolist()
        n_held = sum(row in place_of for row in retrieved)
        expected_hits = [expected_hits[0] + n_held, expected_hits[1] + len(retrieved)]
        segment = step % n_segments
        place_of = {row: at for row, at in place_of.items() if at // budget != segment}
        place_of.update({row: segment * budget + place for place, row in enumerate(retrieved)})
        assert slots[:n_rows].tolist() == [place_of.get(row, -1) for row in range(n_rows)]
        assert held[segment].tolist() == rows.tolist() and int(counts[segment]) == len(retrieved)
        assert hits.tolist() == expected_hits and int(turn) == (step + 1) % n_segments
    assert budget == 1 or 0 < expected_hits[0] < expected_hits[1]  # the steps overlap, not wholly


def cache_state(n_rows, n_segments, budget):
    """An empty cache's slots, held rows, counts, turn and hits."""
    return (
        torch.full((n_rows + 1,), -1, dtype=torch.int32, device=DEVICE),
        torch.zeros(n_segments, budget, dtype=torch.long, device=DEVICE),
        torch.zeros(n_segments, dtype=torch.long, device=DEVICE),
        torch.zeros(1, dtype=torch.long, device=DEVICE),
    )


def test_dispatch_and_bad_input():
    slots, held, counts, turn = cache_state(10, 1, 4)
    hits = torch.zeros(2, dtype=torch.long, device=DEVICE)
    rows, three = torch.tensor([2, 5, 7, 0], device=DEVICE), torch.tensor(3, device=DEVICE)
    refresh_slots(slots, held, counts, turn, rows, three, hits)
    assert slots[:10].tolist() == [-1, -1, 0, -1, -1, 1, -1, 2, -1, -1] and hits.tolist() == [0, 3]
    refresh_slots(slots, held, counts, turn, torch.tensor([0, 5, 9, 0], device=DEVICE), three, hits)
    assert slots[:10].tolist() == [0, -1, -1, -1, -1, 1, -1, -1, -1, 2] and hits.tolist() == [1, 6]
    for bad, message in [
        ((slots.long(), held, counts, turn, rows, three, hits), "slots must be"),
        ((slots, held, counts, turn, torch.arange(5, device=DEVICE), three, hits), "fewer than the 5 retrieved"),
        ((slots, held, counts, turn, rows, three, hits.int()), "hits must be"),
        ((slots, held[0], counts, turn, rows, three, hits), "held must be"),
        ((slots, held, counts[:0], turn, rows, three, hits), "counts must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            refresh_slots(*bad)
