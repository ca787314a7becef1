"""Votes shared between layers (ltri.shared_votes): what a layer publishes per position, another reads per span
(the pieces ``kernels.settled_votes``' reference reads and publishes with)."""

import torch
from ltri.kernels.settled_votes import publish_votes
from ltri.kernels.span_max import span_max

from ltri.shared_votes import SharedVotes


def test_a_span_reads_the_largest_vote_published_on_its_tokens():
    generator = torch.Generator().manual_seed(0)
    shared = SharedVotes(n_layers=2)
    first = 5  # sinks before the stored positions
    publisher_lengths = torch.randint(1, 9, (40,), generator=generator)
    owner = torch.repeat_interleave(torch.arange(40), publisher_lengths)
    votes = torch.randn(40, generator=generator)
    votes[::7] = float("-inf")  # not found: publishes nothing
    shared.begin_step(tokens_seen=1)
    published = shared.args(first, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), owner, 12, 1.0)
    publish_votes(published.current, first, owner, votes, published.n_layers)
    n_rows = int(publisher_lengths.sum())
    reader_lengths = torch.randint(1, 12, (30,), generator=generator)
    reader_lengths[-1] = 0  # an empty span reads 0
    first_rows = torch.cumsum(reader_lengths, 0) - reader_lengths
    keep = first_rows + reader_lengths <= n_rows
    first_rows, reader_lengths = first_rows[keep], reader_lengths[keep]
    got = span_max(shared.previous, shared.current, first, first_rows, reader_lengths, max_len=12)
    per_position = torch.where(torch.isfinite(votes), votes, 0.0)[owner] / 2
    for span, (row, length) in enumerate(zip(first_rows.tolist(), reader_lengths.tolist(), strict=True)):
        expected = max([0.0] + per_position[row : row + length].tolist())
        assert abs(float(got[span]) - expected) < 1e-6


def test_a_new_step_moves_this_steps_votes_to_the_last_in_place():
    shared = SharedVotes(n_layers=1)
    shared.begin_step(tokens_seen=1)
    owner = torch.zeros(4, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    publish_votes(shared.args(0, empty, empty, owner, 4, 1.0).current, 0, owner, torch.tensor([0.5]), 1)
    previous, current = shared.previous, shared.current
    shared.begin_step(tokens_seen=2)
    assert shared.previous is previous and shared.current is current  # same tensors: a captured step reads them
    assert torch.equal(previous[:4], torch.full((4,), 0.5)) and not current.any()
    shared.begin_step(tokens_seen=2)  # the other layers of the same step change nothing
    assert torch.equal(previous[:4], torch.full((4,), 0.5))
