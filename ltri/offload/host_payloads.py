"""A layer's stored span payloads in pinned host memory, which the GPU reads directly (zero copy).

Decode steps gather their retrieved tokens from here inside a CUDA graph: a CUDA tensor that aliases
pinned host memory (CUDA's unified virtual addressing) is read by ordinary kernels over PCIe, so a step
needs no host decision, no cache lookup and no copy enqueued by the host. The span store (LMDB) stays
the durable copy; this one lives as long as the session.

Layout, token-major so that one token's keys and values are one contiguous 4 KB read for a
Llama-3-8B layer (8 KV heads, head dim 128, bf16):

    tokens  (capacity, 2, nheads_kv, headdim)   stored token t (t = text position - n_sink) at row t;
                                                [:, 0] keys, [:, 1] values, pre-RoPE, in the model dtype

Stored tokens of a layer are consecutive text positions (sinks first, then every stored span in order),
so a span's tokens are one run of rows. Capacity grows by a quarter; growing moves the rows to a new
allocation, and device views taken before it are stale (``generation`` counts the moves).
"""

from __future__ import annotations

import torch


class HostPayloads:
    """nheads_kv, headdim, dtype: one stored token's shape; device: where the aliasing views are read."""

    def __init__(self, nheads_kv: int, headdim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.row_shape = (2, nheads_kv, headdim)
        self.dtype = dtype
        self.tokens = torch.empty(0, *self.row_shape, dtype=dtype)  # (capacity, 2, nheads_kv, headdim)
        self.length = 0
        self.generation = 0  # bumped whenever the rows move to a new allocation
        self._device_view: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.tokens.shape[0]

    def nbytes(self) -> int:
        return self.tokens.nbytes

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (nheads_kv, n, headdim) of the next n stored tokens, on any device.

        A device-to-host copy is enqueued on the current stream (not waited for): any later kernel on that
        stream that reads the rows runs after it."""
        n = keys.shape[1]
        self.reserve(self.length + n)
        rows = torch.stack([keys, values]).permute(2, 0, 1, 3)  # (n, 2, nheads_kv, headdim)
        self.tokens[self.length : self.length + n].copy_(rows, non_blocking=True)
        self.length += n

    def reserve(self, needed: int) -> None:
        """Room for needed tokens; growth by at least a quarter, rows copied over."""
        if needed <= self.capacity:
            return
        capacity = max(needed, self.capacity + self.capacity // 4, 1024)
        grown = torch.empty(capacity, *self.row_shape, dtype=self.dtype, pin_memory=self._pinned())
        if self.length:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # copies still writing the old rows
            grown[: self.length].copy_(self.tokens[: self.length])
        self.tokens = grown
        self.generation += 1
        self._device_view = None

    def device_view(self) -> torch.Tensor:
        """The rows as a tensor on the device (capacity, 2, nheads_kv, headdim): on CUDA an alias of the
        pinned host rows (reads cross PCIe, nothing is copied); elsewhere the host tensor itself."""
        if self.device.type != "cuda":
            return self.tokens
        if self._device_view is None:
            self._device_view = mapped_on_device(self.tokens, self.device)
        return self._device_view

    def _pinned(self) -> bool:
        return self.device.type == "cuda"


class _CudaArray:
    """The minimal ``__cuda_array_interface__`` (version 3) torch needs to wrap a device address."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str, owner: torch.Tensor) -> None:
        self.owner = owner  # keeps the host allocation alive as long as a view of it
        self.__cuda_array_interface__ = {"data": (address, False), "shape": shape, "typestr": typestr, "version": 3}


def mapped_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing the contiguous pinned host tensor host (same shape and dtype).

    With unified virtual addressing (every 64-bit CUDA platform) memory from cudaHostAlloc, which is
    what torch's pinned allocator uses, has the same address on the host and the device."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("only a contiguous pinned host tensor can be read by the GPU in place")
    raw = host.view(torch.int16) if host.element_size() == 2 else host.view(torch.int32)
    typestr = "<i2" if host.element_size() == 2 else "<i4"
    with torch.cuda.device(device):
        alias = torch.as_tensor(_CudaArray(raw.data_ptr(), tuple(raw.shape), typestr, host), device=device)
    return alias.view(host.dtype)
