"""A growable buffer of pre-RoPE keys, values and their text positions for one layer.

keys, values: (batch, nheads_kv, seqlen, headdim); positions: (seqlen,) int64.
Capacity doubles when full, so appending n tokens costs O(n) amortised.
"""

from __future__ import annotations

import torch


class TokenBuffer:
    """max_tokens: the most tokens this buffer will ever hold, if known; growth stops there."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        n_new = keys.shape[2]
        self._reserve(keys, values, self.length + n_new)
        end = self.length + n_new
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self._positions[self.length : end] = positions
        self.length = end

    def resize(self, capacity: int) -> None:
        """A new allocation of capacity tokens (at least the held ones), the held tokens copied over."""
        self._allocate(self._keys, self._values, max(capacity, self.length))

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole allocation: keys, values (batch, nheads_kv, capacity, headdim), positions (capacity,).

        Whoever writes tokens past length into them says so with count_written."""
        return self._keys, self._values, self._positions

    def count_written(self, n: int) -> None:
        """n tokens were written into buffers() right after the held ones: they are held now."""
        if self.length + n > self.capacity:
            raise ValueError(f"{n} tokens written past {self.length} held overflow the capacity {self.capacity}")
        self.length += n

    def overwrite_tail(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New keys and values for the held tokens, from the last length tokens of keys, values (positions stay)."""
        if self.length == 0:
            return
        if keys.shape[2] < self.length:
            raise ValueError(f"overwrite_tail needs at least the {self.length} held tokens, got {keys.shape[2]}")
        self._keys[:, :, : self.length] = keys[:, :, keys.shape[2] - self.length :]
        self._values[:, :, : self.length] = values[:, :, values.shape[2] - self.length :]

    def keys(self) -> torch.Tensor:
        return self._slice(self._keys)

    def values(self) -> torch.Tensor:
        return self._slice(self._values)

    def positions(self) -> torch.Tensor:
        if self._positions is None:
            return torch.empty(0, dtype=torch.long)
        return self._positions[: self.length]

    def drop_last(self, n: int) -> None:
        """Forget the last n held tokens (their slots are written again by what is appended next)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} of {self.length} held tokens")
        self.length -= n

    def keep(self, n_head: int, n_tail: int) -> None:
        """Keep the first n_head and the last n_tail tokens, dropping the middle (in place)."""
        if self.length <= n_head + n_tail:
            return
        tail_start = self.length - n_tail
        for tensor in (self._keys, self._values):
            tensor[:, :, n_head : n_head + n_tail] = tensor[:, :, tail_start : self.length].clone()
        self._positions[n_head : n_head + n_tail] = self._positions[tail_start : self.length].clone()
        self.length = n_head + n_tail

    def state(self) -> dict:
        """The held tokens as CPU tensors (empty dict when nothing was ever appended)."""
        if self._keys is None:
            return {}
        return {"keys": self.keys().cpu(), "values": self.values().cpu(), "positions": self.positions().cpu()}

    def load_state(self, state: dict, device) -> None:
        """Replace the contents with a state() taken earlier."""
        self._keys = self._values = self._positions = None
        self.length = 0
        if state:
            self.append(state["keys"].to(device), state["values"].to(device), state["positions"].to(device))

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (capacity, not length)."""
        if self._keys is None:
            return 0
        return self._keys.nbytes + self._values.nbytes

    def _slice(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise RuntimeError("TokenBuffer is empty and has no shape yet")
        return tensor[:, :, : self.length]

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 64)
        if self.max_tokens is not None:
            if needed > self.max_tokens:
                raise RuntimeError(f"TokenBuffer holds at most {self.max_tokens} tokens, {needed} asked for")
            capacity = min(capacity, self.max_tokens)
        self._allocate(keys, values, capacity)

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New buffers of capacity tokens, shaped like keys and values, the held tokens copied over."""
        batch, nheads_kv, _, headdim = keys.shape
        new_keys = keys.new_empty(batch, nheads_kv, capacity, headdim)
        new_values = values.new_empty(batch, nheads_kv, capacity, values.shape[-1])
        new_positions = torch.empty(capacity, dtype=torch.long, device=keys.device)
        if self.length:
            new_keys[:, :, : self.length] = self.keys()
            new_values[:, :, : self.length] = self.values()
            new_positions[: self.length] = self.positions()
        self._keys, self._values, self._positions = new_keys, new_values, new_positions
