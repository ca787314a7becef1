"""Votes shared between layers: each layer publishes where its attention goes, others borrow from it.

Spans differ per layer, so votes are shared per text position: a layer spreads each span's vote
over the span's tokens; another layer reads, for each of its own spans, the largest shared vote
among its tokens. A step reads what the previous step published (all layers) plus what the layers
before it published in this step. Vocabulary: n_positions = tokens of the text held as spans.
Both buffers are updated in place (a captured decode step reads and writes them) and grow by a quarter;
positions past those published hold 0.
"""

from __future__ import annotations

import torch

from ltri.growth import with_room
from ltri.kernels.settled_votes import SharedArgs


class SharedVotes:
    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.previous = torch.zeros(0)  # (n_positions,) mean over layers of the votes published last step
        self.current = torch.zeros(0)  # (n_positions,) the same, for the step in progress
        self.step_tokens = -1  # tokens seen when the current step began

    def args(
        self, first: int, first_rows: torch.Tensor, lengths: torch.Tensor, owner: torch.Tensor, max_len: int,
        collaboration: float,
    ) -> SharedArgs:  # fmt: skip
        """What a layer's settled votes (``kernels.settled_votes``) read and publish: spans that cover positions
        first + first_rows[s] onwards for lengths[s] <= max_len tokens, within the rows owner names (n_rows,) from
        first on (room is made for them). A span reads the largest of previous + current over its positions (0 when
        none is positive); a layer publishes each span's vote / n_layers over its positions."""
        self.reserve(first + owner.numel(), owner.device)
        return SharedArgs(
            self.previous, self.current, first, first_rows, lengths, owner, max_len, self.n_layers, collaboration
        )

    def begin_step(self, tokens_seen: int) -> None:
        """Called by every layer before it reads; the first call of a step moves current to previous."""
        if tokens_seen == self.step_tokens:
            return
        self.step_tokens = tokens_seen
        self.turn()

    def turn(self) -> None:
        """What this step published becomes the last step's; the new step starts with nothing (in place)."""
        self.previous.copy_(self.current)
        self.current.zero_()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Copies of both buffers and the step's token count, for ``restore`` (after a draft, ``ltri.draft``)."""
        return self.previous.clone(), self.current.clone(), self.step_tokens

    def restore(self, snapshot: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        """Back to a snapshot, in place (positions published since hold 0 again)."""
        previous, current, self.step_tokens = snapshot
        for buffer, saved in ((self.previous, previous), (self.current, current)):
            buffer.zero_()
            buffer[: saved.numel()] = saved

    def reserve(self, n_positions: int, device) -> None:
        """Room for n_positions on device (new buffers only when they move or grow)."""
        self.previous = with_room(self.previous, n_positions, device)
        self.current = with_room(self.current, n_positions, device)

    def state(self) -> dict:
        return {"previous": self.previous.cpu(), "current": self.current.cpu(), "step_tokens": self.step_tokens}

    def load_state(self, state: dict, device) -> None:
        self.previous, self.current = state["previous"].to(device), state["current"].to(device)
        self.step_tokens = int(state["step_tokens"])
