"""A layer's stored span payloads in pinned host memory, which the GPU reads directly (zero copy).

Decode steps gather their retrieved tokens from here inside a CUDA graph: a CUDA tensor that aliases
pinned host memory (CUDA's unified virtual addressing) is read by ordinary kernels over PCIe, so a step
needs no host decision, no cache lookup and no copy enqueued by the host. While a layer keeps its rows they
are its stored tokens' only copy: the span store (LMDB) gets them at a save, or before the rows are dropped when
the host runs short (``SpanMemory.store_deferred``).

Layout, token-major so that one token's keys and values are one contiguous 4 KB read for a
Llama-3-8B layer (8 KV heads, head dim 128, bf16):

    tokens  (max_tokens, 2, nheads_kv, headdim)  stored token t (t = text position - n_sink) at row t;
                                                 [:, 0] keys, [:, 1] values, pre-RoPE, in the model dtype

The rows are one reserved range of virtual addresses (an anonymous mapping that takes no memory until
written); on CUDA the part in use is page-locked and registered with the driver piece by piece as it
fills. So the rows never move: the tensor, its device alias and any CUDA graph that reads it stay valid
while the layer stores more. Rows past ``length`` must not be read.

``HostRows`` keeps rows of any shape this way (Loki's projected keys too: ``offload.projected_keys``);
``HostPayloads`` is the stored tokens' keys and values.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

# Host memory left to everything else when more rows are locked (the span store may live in RAM too).
HOST_MARGIN_BYTES = 16 * 2**30
_MAP_NORESERVE = 0x4000  # Linux; Python 3.11's mmap module does not name it
_REGISTER_MAPPED = 2  # cudaHostRegisterMapped
_LOCK_STEP_BYTES = 256 * 2**20  # rows are locked at least this much at a time, after the first piece
_FIRST_LOCK_BYTES = 32 * 2**20  # the first piece, locked while the first append waits: an eighth of a full one
_HUGE_PAGE = 2 * 2**20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault the pages in, writable, without touching them from user space


class HostMemoryShort(RuntimeError):
    """Locking more rows would leave the host less than HOST_MARGIN_BYTES of available memory."""


class HostRowsSwitch:
    """Shared by the layers of one session: once one layer's rows no longer fit, every layer drops its own
    (a decode step is captured only when all layers have theirs, so the others' would be held for nothing)."""

    def __init__(self) -> None:
        self.on = True


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def physical_host_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reserved_region(nbytes: int) -> mmap.mmap:
    """nbytes of address space for host rows: private, anonymous, taking memory only where written or locked."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # 2 MB pages: locking a piece faults it in; with 4 KB pages cudaHostRegister took 7 s of an 8-chunk
        # prefill profile on the H100 machine (benchmarks/speed/NOTES.md step 7).
        region.madvise(mmap.MADV_HUGEPAGE)
    return region


class HostRows:
    """Rows of one shape in pinned host memory that the device reads in place: row_shape, dtype; device: where
    they are read; max_tokens: rows reserved (address space only), by default as many as the host's RAM could
    hold. lock_scale: the share of _FIRST_LOCK_BYTES and _LOCK_STEP_BYTES its pieces are locked by (rows smaller
    than a token's keys and values lock the same tokens a piece in fewer bytes)."""

    def __init__(
        self,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        max_tokens: int = 0,
        lock_scale: float = 1.0,
    ) -> None:
        self.device = torch.device(device)
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.max_tokens = max_tokens or physical_host_bytes() // self.row_bytes
        self._region = reserved_region(self.max_tokens * self.row_bytes)
        self._bytes = torch.frombuffer(self._region, dtype=torch.uint8)  # (max_tokens * row_bytes,)
        self.tokens = self._bytes.view(dtype).view(self.max_tokens, *self.row_shape)
        self.length = 0
        self._locked = None
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            registration = CudaRegistration(index)
            self._locked = _LockedPrefix(
                self.tokens.data_ptr(),
                registration.register,
                registration.unregister,
                _registration_threads(REGISTRATION_THREADS),
                capacity=-(-len(self._region) // mmap.PAGESIZE) * mmap.PAGESIZE,  # the mapping's whole pages
                prefault=prefault_how(PREFAULT),
                lock_scale=lock_scale,
            )
        self._device_view: torch.Tensor | None = None

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize

    def nbytes(self) -> int:
        """Bytes of host memory the rows in use take."""
        return self.length * self.row_bytes

    def append_rows(self, rows: torch.Tensor) -> None:
        """The next rows (n, *row_shape), on any device, in the rows' dtype.

        A device-to-host copy is enqueued on the current stream (not waited for): any later kernel on that
        stream that reads the rows runs after it. HostMemoryShort (nothing stored) when the host is short."""
        n = rows.shape[0]
        if self.length + n > self.max_tokens:
            raise HostMemoryShort(f"{self.length + n} stored tokens exceed the {self.max_tokens} rows reserved")
        start, stop = self.length * self.row_bytes, (self.length + n) * self.row_bytes
        source = rows.contiguous().view(-1).view(torch.uint8)
        pieces = [(start, stop)]
        if self._locked is not None:
            self._locked.extend(stop)
            pieces = self._locked.split(start, stop)  # a copy must not cross from one registration to the next
        for low, high in pieces:
            self._bytes[low:high].copy_(source[low - start : high - start], non_blocking=True)
        self.length += n

    def lock_ahead(self) -> None:
        """On CUDA, start page-locking the first rows on the registration thread now, so that the first append
        seldom waits for it (benchmarks/speed/NOTES.md step 23); elsewhere nothing."""
        if self._locked is not None:
            self._locked.start()

    def device_view(self) -> torch.Tensor:
        """The rows as a tensor on the device (max_tokens, *row_shape): on CUDA an alias of the locked host rows
        (reads cross PCIe, nothing is copied); elsewhere the host tensor itself."""
        if self._locked is None:
            return self.tokens
        if self._device_view is None:
            self._device_view = mapped_on_device(self.tokens, self.device)
        return self._device_view

    def close(self) -> None:
        """Unlock the rows and give their pages back to the host (views of them must not be read after this:
        they read zeros). Copies into the rows still under way on the device are waited for first."""
        self._device_view = None
        touched = self.nbytes()  # the rows, and below the locked pieces, which may reach past them
        if self._locked is not None:
            torch.cuda.synchronize(self.device)
            touched = max(touched, self._locked.release())
            self._locked = None
        if touched:
            pages = -(-touched // mmap.PAGESIZE) * mmap.PAGESIZE
            self._region.madvise(mmap.MADV_DONTNEED, 0, min(pages, len(self._region)))
        self.length = 0

    def __del__(self) -> None:
        self.close()


class HostPayloads(HostRows):
    """A layer's stored tokens: nheads_kv, headdim, dtype: one stored token's shape; rows (max_tokens, 2, nheads_kv,
    headdim), [:, 0] keys, [:, 1] values."""

    def __init__(
        self, nheads_kv: int, headdim: int, dtype: torch.dtype, device: torch.device | str, max_tokens: int = 0
    ) -> None:
        super().__init__((2, nheads_kv, headdim), dtype, device, max_tokens)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values (nheads_kv, n, headdim) of the next n stored tokens, on any device (see append_rows)."""
        self.append_rows(torch.stack([keys, values]).permute(2, 0, 1, 3))  # (n, 2, nheads_kv, headdim)


class _LockedPrefix:
    """The first bytes of a reserved range, page-locked and registered with CUDA in pieces as they are needed.

    Registering a piece is slow: 74.6 ms a call in a 128K prefill profile on the H100 (about 256 MB a piece, 36% of
    the host's time in those chunks: ``benchmarks/speed/results/e2e_h100_7e52b02_profile_prefill_profile_131072.txt``),
    and every layer's rows reach the end of a piece in the same chunk. So once the rows come within half a piece of
    the end, the next piece is registered on a background thread (torch's binding releases the GIL); the append that
    needs it waits only if it is not done yet; the first piece, which nothing hides, is small. A background
    registration that fails is dropped and the append registers synchronously, which decides whether the host is
    short.

    Registration still slows the prefill while it runs: in every 128K prefill on the H100 the 16K-token slices in
    which the layers' 256 MB pieces register ran at half the speed of the others (benchmarks/speed/NOTES.md step
    17). A registration faults the piece's pages in (the kernel zeroes them) before it pins them, all inside the
    CUDA call; so the background job first faults them in with prefault(address, size), outside CUDA, and the call
    only pins present pages: a 256 MB piece's registration then takes 4.9 ms instead of 57, and those slices run at
    the others' speed (128K prefill 10,120 tokens/s against 7,118 without, one H100, step 17).

    register(address, size) -> CUDA error code (0: done) and unregister(address) default to the CUDA runtime's on
    the current device; executor: where background registrations run (None: none, everything synchronous);
    capacity: bytes of the reserved range (None: unbounded), past which no piece reaches (CUDA refuses to register
    addresses that are not mapped, so a small range is locked whole rather than a full piece); prefault: run on a
    background piece before its registration (None: nothing); lock_scale: the share of the piece sizes taken.
    """

    def __init__(
        self,
        address: int,
        register=None,
        unregister=None,
        executor=None,
        capacity: int | None = None,
        prefault=None,
        lock_scale: float = 1.0,
    ) -> None:
        self.address = address
        self.lock_scale = lock_scale
        self.capacity = capacity
        self.pieces: list[tuple[int, int]] = []  # (address, bytes) registered
        self.nbytes = 0
        self._register = register or CudaRegistration(None).register
        self._unregister = unregister or CudaRegistration(None).unregister
        self._executor = executor
        self._prefault = prefault
        self._pending: tuple[int, int, Future] | None = None  # (address, bytes, its registration) under way

    def start(self) -> None:
        """Start registering the first piece in the background, ahead of the first extend that needs it (which then
        waits for it, or registers it synchronously if the background call failed)."""
        if self.nbytes == 0:
            self._prefetch(0)

    def extend(self, needed: int) -> None:
        """Registers at least the first needed bytes (HostMemoryShort when the host cannot spare them), then starts
        the next piece's registration in the background when the end is near."""
        while needed > self.nbytes:
            if self._pending is not None:
                self._settle()
            else:
                self._lock(self._step(needed))
        self._prefetch(needed)

    def _step(self, needed: int) -> int:
        """Bytes of the next piece: what is needed, at least _LOCK_STEP_BYTES (_FIRST_LOCK_BYTES for the first,
        whose registration nothing hides) and a quarter of what is locked, ending on a (huge) page boundary so
        that two registrations never share a page."""
        least = int((_FIRST_LOCK_BYTES if self.nbytes == 0 else _LOCK_STEP_BYTES) * self.lock_scale)
        size = max(needed - self.nbytes, least, self.nbytes // 4)
        size = -(-size // _HUGE_PAGE) * _HUGE_PAGE
        if self.capacity is None:
            return size
        return min(size, max(self.capacity - self.nbytes, needed - self.nbytes))

    def _lock(self, size: int) -> None:
        if not _host_can_spare(size):
            raise HostMemoryShort(
                f"locking {size / 2**30:.1f} GiB more would leave the host under {HOST_MARGIN_BYTES >> 30} GiB"
            )
        address = self.address + self.nbytes
        error = self._register(address, size)
        if error != 0:
            raise HostMemoryShort(f"cudaHostRegister failed with CUDA error {error}")
        self._add(address, size)

    def _add(self, address: int, size: int) -> None:
        self.pieces.append((address, size))
        self.nbytes += size

    def _prefetch(self, used: int) -> None:
        """Start registering the next piece in the background when less than half a piece is left."""
        if self._executor is None or self._pending is not None:
            return
        size = self._step(self.nbytes)
        if size <= 0 or self.nbytes - used >= size // 2 or not _host_can_spare(size):
            return
        address = self.address + self.nbytes
        self._pending = (address, size, self._executor.submit(self._register_in_background, address, size))

    def _register_in_background(self, address: int, size: int) -> int:
        if self._prefault is not None:
            self._prefault(address, size)
        return self._register(address, size)

    def _settle(self) -> None:
        """Wait for the background registration; keep its piece if it succeeded."""
        address, size, registration = self._pending
        self._pending = None
        try:
            error = registration.result()
        except Exception:  # noqa: BLE001 (any failure: the synchronous path decides)
            error = -1
        if error == 0:
            self._add(address, size)

    def split(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Byte range [start, stop) (offsets from the start, registered) cut where one registration ends."""
        cuts, offset = [], 0
        for _, size in self.pieces:
            low, high = max(start, offset), min(stop, offset + size)
            if low < high:
                cuts.append((low, high))
            offset += size
        return cuts

    def release(self) -> int:
        """Unregister every piece (a background one once it is done); returns the bytes they held."""
        if self._pending is not None:
            self._settle()
        for address, _ in self.pieces:
            self._unregister(address)
        released, self.nbytes = self.nbytes, 0
        self.pieces.clear()
        return released


# How pieces are faulted in before they register (NOTES.md step 17): "piece" (one call a piece), "steps" (2 MB a
# call, so that the kernel's memory-map lock is taken briefly), or "none" (cudaHostRegister faults them in).
# benchmarks/speed/e2e.py --host-prefault sets it for rows that measure what it changes.
PREFAULT = "steps"  # steps against piece: 10,120 against 9,962 tokens/s at 128K, one run each (step 17)
PREFAULT_STEP_BYTES = 2 << 20


def prefault_how(how: str):
    """The _LockedPrefix's prefault(address, size) for PREFAULT's value, or None."""
    if how == "none":
        return None
    if how == "steps":
        return functools.partial(prefault_pages, step=PREFAULT_STEP_BYTES)
    if how == "piece":
        return prefault_pages
    raise ValueError(f"Unknown prefault {how!r}: piece, steps or none.")


def prefault_pages(address: int, size: int, step: int | None = None) -> None:
    """Fault in the pages of [address, address + size) of a private anonymous mapping, as zeros, without holding
    the GIL: madvise(MADV_POPULATE_WRITE), or where the kernel lacks it, a memset (the range must hold nothing yet);
    step bytes a call (a multiple of the page size), else all in one. address: page-aligned."""
    step = step or size
    for start in range(address, address + size, step):
        length = min(step, address + size - start)
        if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) != 0:
            ctypes.memset(start, 0, length)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _host_can_spare(size: int) -> bool:
    available = available_host_bytes()
    return available is None or available - size >= HOST_MARGIN_BYTES


class CudaRegistration:
    """cudaHostRegister (mapped) and cudaHostUnregister with device_index current (None: the thread's current
    device), so that a background thread registers for the rows' device."""

    def __init__(self, device_index: int | None) -> None:
        self.device_index = device_index

    def register(self, address: int, size: int) -> int:
        with self._on_device():
            return int(torch.cuda.cudart().cudaHostRegister(address, size, _REGISTER_MAPPED))

    def unregister(self, address: int) -> None:
        with self._on_device():
            torch.cuda.cudart().cudaHostUnregister(address)

    def _on_device(self):
        return contextlib.nullcontext() if self.device_index is None else torch.cuda.device(self.device_index)


# Background threads that fault in and register host-row pieces, shared by every layer. Each layer has at most one
# piece under way, so its pieces stay in order with any number; benchmarks/speed/e2e.py --host-register-threads
# sets it for rows that measure more than one (NOTES.md step 20).
REGISTRATION_THREADS = 1


@functools.cache
def _registration_threads(n_threads: int) -> ThreadPoolExecutor:
    """The background threads that register host rows, shared by every layer (made on first use of that many)."""
    return ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="ltri-host-rows")


class _CudaArray:
    """The minimal ``__cuda_array_interface__`` (version 3) torch needs to wrap a device address."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str, owner: torch.Tensor) -> None:
        self.owner = owner  # keeps the host allocation alive as long as a view of it
        self.__cuda_array_interface__ = {"data": (address, False), "shape": shape, "typestr": typestr, "version": 3}


def mapped_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing the contiguous host tensor host (same shape and dtype), whose memory is pinned
    (torch's pinned allocator) or registered with cudaHostRegister: with unified virtual addressing (every
    64-bit CUDA platform) such memory has the same address on the host and the device."""
    if not host.is_contiguous():
        raise ValueError("only a contiguous host tensor can be read by the GPU in place")
    raw = host.view(torch.int16) if host.element_size() == 2 else host.view(torch.int32)
    typestr = "<i2" if host.element_size() == 2 else "<i4"
    with torch.cuda.device(device):
        alias = torch.as_tensor(_CudaArray(raw.data_ptr(), tuple(raw.shape), typestr, host), device=device)
    return alias.view(host.dtype)
