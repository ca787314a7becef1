"""Span payloads in LMDB, keyed by (layer, span id), each with a crc32 checked on every read.

Layout of the LMDB environment (a directory): three named databases,
    payloads  key -> the payload's raw bytes (a contiguous tensor, e.g. (2, nheads_kv, span_len, headdim))
    crc32     key -> 4-byte big-endian zlib crc32 + 8-byte big-endian payload length
    meta      b"format" -> FORMAT, so a foreign LMDB environment is refused
with key = 4-byte big-endian layer + 8-byte big-endian span id, so keys sort by layer, then span.
Payloads live in a named database rather than the main one because LMDB lists the names of named
databases as keys of the main database. The store keeps no dtype or shape: the reader supplies them.

Writes are batched, one transaction per put_spans; the environment is opened with sync=False and
metasync=False, so a commit survives the writer's crash (SIGKILL) but not an OS crash until flush().
LMDB must not be opened twice in one process (closing one handle drops the other's locks), so a path
can be open in one SpanStore at a time (a store that was garbage collected without close() no longer counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import struct
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import torch

from ltri.errors import LtriError
from ltri.offload.background_writer import BackgroundWriter
from ltri.offload.staging import StagingPool

FORMAT = b"ltri-span-store/1"
KEY = struct.Struct(">IQ")  # layer, span id
CHECKSUM = struct.Struct(">IQ")  # crc32, payload length in bytes
_open_stores: weakref.WeakValueDictionary[Path, SpanStore] = weakref.WeakValueDictionary()  # by resolved path


def span_key(layer: int, span_id: int) -> bytes:
    return KEY.pack(layer, span_id)


def payload_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class SpanStore:
    def __init__(
        self, path: Path | str, readonly: bool = False, map_size: int = 1 << 40, background_writes: bool = False
    ) -> None:
        """background_writes: put_spans returns once the payloads are copied to the host, and one thread
        writes them (``ltri.offload.background_writer``); reads of those spans, and whole-store calls, wait
        for them. A crash then loses the writes still queued (a saved session flushes them first)."""
        self.path = Path(path)
        self.readonly = readonly
        self._key = self.path.resolve()
        if self._key in _open_stores:
            raise RuntimeError(f"the span store at {self.path} is already open in this process; close it first")
        self.env = self._open_env(map_size)
        self._payloads, self._checksums, self._meta = self._open_dbs()
        _open_stores[self._key] = self
        self._staging = StagingPool()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._writer = BackgroundWriter() if background_writes and not readonly else None

    # --- writing

    def put_spans(self, layer: int, span_ids: Sequence[int], payloads: Sequence[torch.Tensor]) -> None:
        """Stores each payload's raw bytes and crc32 under (layer, span id), all in one transaction.

        The payloads are copied to the host before this returns (the caller may change them afterwards);
        with background writes the transaction runs later, on the writer's thread."""
        if len(span_ids) != len(payloads):
            raise ValueError(f"{len(span_ids)} span ids for {len(payloads)} payloads")
        if self.readonly:
            raise LtriError(f"The span store at {self.path} is open read-only: it takes no new spans.")
        span_ids = [int(span_id) for span_id in span_ids]
        copied = host_copy(payloads)
        if self._writer is None:
            self._write(layer, span_ids, copied)
        else:
            self._writer.submit(lambda: self._write(layer, span_ids, copied), layer, span_ids)

    def _write(self, layer: int, span_ids: list[int], copied: HostCopy) -> None:
        with self._lmdb_errors("write to"), self.env.begin(write=True) as txn:
            for span_id, blob in zip(span_ids, copied.blobs(), strict=True):
                key = span_key(layer, span_id)
                txn.put(key, blob, db=self._payloads)
                txn.put(key, CHECKSUM.pack(zlib.crc32(blob), blob.nbytes), db=self._checksums)

    def wait_for_writes(self) -> None:
        """Return once every span handed to put_spans is in the store (raises a failed write's error)."""
        if self._writer is not None:
            self._writer.drain()

    def flush(self) -> None:
        """Forces committed transactions to disk (they already survive a crash of this process)."""
        self.wait_for_writes()
        if not self.readonly:
            self.env.sync(True)

    # --- reading

    def read_spans(
        self,
        layer: int,
        span_ids: Sequence[int],
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> list[torch.Tensor]:
        """The payloads of span_ids, as new tensors of the given shapes and dtype on device (crc32 checked)."""
        if len(span_ids) != len(shapes):
            raise ValueError(f"{len(span_ids)} span ids for {len(shapes)} shapes")
        if self._writer is not None:
            self._writer.wait_for(layer, [int(span_id) for span_id in span_ids])
        device = torch.device(device)
        if device.type == "cuda":
            return self._read_to_cuda(layer, span_ids, shapes, dtype, device)
        results = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
        with self.env.begin(buffers=True) as txn:
            for span_id, result in zip(span_ids, results, strict=True):
                payload = self._checked_payload(txn, layer, int(span_id), result.nbytes)
                byte_view(result)[:] = payload  # payload: a memoryview into the map, dead once txn ends
        return results

    def _read_to_cuda(
        self, layer: int, span_ids: Sequence[int], shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device
    ) -> list[torch.Tensor]:
        """Map -> pinned staging (host memcpy) -> GPU with one non-blocking copy on a side stream.

        Results are allocated on the side stream and recorded on the current one; the current stream
        waits for the copies, so the tensors are ready for whatever the caller enqueues next.
        """
        sizes = [payload_nbytes(shape, dtype) for shape in shapes]
        offsets = np.cumsum([0, *sizes[:-1]]).tolist() if sizes else []
        with self.env.begin(buffers=True) as txn:
            buffer, staging = self._staging.acquire(sum(sizes))
            host = staging.numpy()
            for span_id, size, offset in zip(span_ids, sizes, offsets, strict=True):
                host[offset : offset + size] = self._checked_payload(txn, layer, int(span_id), size)
        current, side = torch.cuda.current_stream(device), self._side_stream(device)
        with torch.cuda.stream(side):
            block = torch.empty(sum(sizes), dtype=torch.uint8, device=device)  # one copy for every span
            block.copy_(staging, non_blocking=True)
        self._staging.release(buffer, side)
        current.wait_stream(side)
        block.record_stream(current)
        # Views of the block (offsets are multiples of the element size): it lives while any of them does.
        return [
            block[offset : offset + size].view(dtype).view(shape)
            for shape, size, offset in zip(shapes, sizes, offsets, strict=True)
        ]

    def _checked_payload(self, txn: lmdb.Transaction, layer: int, span_id: int, nbytes: int) -> memoryview:
        key = span_key(layer, span_id)
        payload = txn.get(key, db=self._payloads)
        record = txn.get(key, db=self._checksums)
        if payload is None or record is None:
            raise self._damaged(layer, span_id, "is missing")
        crc, length = CHECKSUM.unpack(record)
        if len(payload) != length or length != nbytes:
            raise self._damaged(layer, span_id, f"holds {len(payload)} bytes where {nbytes} were expected")
        if zlib.crc32(payload) != crc:
            raise self._damaged(layer, span_id, "fails its checksum")
        return payload

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # --- whole-store checks

    def verify(self, span_counts: Sequence[int] | None = None) -> None:
        """Reads every payload and checks its length and crc32; LtriError names the first bad span.

        span_counts: only spans 0..span_counts[layer]-1 of each layer (those a saved session refers
        to), and each of them must be there; None checks everything stored.
        """
        self.wait_for_writes()
        with self.env.begin(buffers=True) as txn:
            for key, record in self._records(txn, span_counts):
                layer, span_id = KEY.unpack(key)
                if not record:
                    raise self._damaged(layer, span_id, "is missing")
                self._checked_payload(txn, layer, span_id, CHECKSUM.unpack(record)[1])
            if span_counts is not None:
                return
            n_payloads = txn.stat(self._payloads)["entries"]
            n_checksums = txn.stat(self._checksums)["entries"]
            if n_payloads != n_checksums:
                raise LtriError(
                    f"The span store at {self.path} is damaged: it holds {n_payloads} payloads but "
                    f"{n_checksums} checksums; ingest the text again."
                )

    def digest(self, span_counts: Sequence[int] | None = None) -> str:
        """sha256 over the (key, crc32, length) records in key order: changes whenever a payload does.

        span_counts: as in verify(); a span it names that is missing changes the digest too.
        """
        self.wait_for_writes()
        digest = hashlib.sha256(FORMAT)
        with self.env.begin() as txn:
            for key, record in self._records(txn, span_counts):
                digest.update(key)
                digest.update(record)
        return digest.hexdigest()

    def nbytes(self) -> int:
        """Payload bytes stored (without LMDB's own overhead)."""
        self.wait_for_writes()
        with self.env.begin() as txn:
            return sum(CHECKSUM.unpack(record)[1] for _, record in self._records(txn))

    def span_ids(self, layer: int) -> list[int]:
        """The span ids stored for layer, ascending."""
        self.wait_for_writes()
        prefix = struct.pack(">I", layer)
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._checksums)
            if not cursor.set_range(prefix):
                return []
            keys = itertools.takewhile(lambda key: key.startswith(prefix), cursor.iternext(values=False))
            return [KEY.unpack(key)[1] for key in keys]

    def _records(
        self, txn: lmdb.Transaction, span_counts: Sequence[int] | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, checksum record) pairs in key order; with span_counts only spans below each layer's count,
        a missing one yielding an empty record."""
        if span_counts is None:
            yield from txn.cursor(db=self._checksums)
            return
        for layer, count in enumerate(span_counts):
            for span_id in range(count):
                key = span_key(layer, span_id)
                yield key, txn.get(key, default=b"", db=self._checksums)

    # --- lifetime

    def copy_to(self, path: Path | str) -> None:
        """A compacted copy of this store in path, which must be empty or not exist yet."""
        self.wait_for_writes()
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise LtriError(f"Cannot copy the span store to {path}: the directory is not empty; choose an empty one.")
        path.mkdir(parents=True, exist_ok=True)
        with self._lmdb_errors("copy"):
            self.env.copy(str(path), compact=True)

    def close(self) -> None:
        """Waits for the queued writes, then closes (a failed write's error is raised once closed)."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            if _open_stores.get(self._key) is self:
                self.env.close()
                del _open_stores[self._key]

    def __enter__(self) -> SpanStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- opening

    def _open_env(self, map_size: int) -> lmdb.Environment:
        if self.path.exists() and not self.path.is_dir():
            raise LtriError(f"{self.path} is a file, not a span store directory; choose a directory.")
        if self.readonly and not (self.path / "data.mdb").is_file():
            raise LtriError(f"There is no span store at {self.path}; ingest the text first.")
        if not self.readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        with self._lmdb_errors("open"):
            return lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=3,
                readonly=self.readonly,
                sync=False,
                metasync=False,
                readahead=False,  # spans are read at random: OS readahead would only pollute the page cache
            )

    def _open_dbs(self) -> tuple[object, object, object]:
        try:
            with self._lmdb_errors("open"):
                dbs = tuple(
                    self.env.open_db(name, create=not self.readonly) for name in (b"payloads", b"crc32", b"meta")
                )
                self._check_format(*dbs)
        except BaseException:
            self.env.close()
            raise
        return dbs

    def _check_format(self, payloads: object, checksums: object, meta: object) -> None:
        with self.env.begin(write=not self.readonly) as txn:
            found = txn.get(b"format", db=meta)
            if found is None and not self.readonly and self._holds_only_our_dbs(txn, payloads):
                txn.put(b"format", FORMAT, db=meta)
                found = FORMAT
        if found != FORMAT:
            raise LtriError(
                f"{self.path} holds an LMDB environment that is not an ltri span store; choose another directory."
            )

    @staticmethod
    def _holds_only_our_dbs(txn: lmdb.Transaction, payloads: object) -> bool:
        names = set(txn.cursor().iternext(values=False))
        return names <= {b"payloads", b"crc32", b"meta"} and txn.stat(payloads)["entries"] == 0

    @contextlib.contextmanager
    def _lmdb_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except lmdb.MapFullError as error:
            raise LtriError(
                f"The span store at {self.path} is full ({error}); open it with a larger map_size."
            ) from error
        except lmdb.NotFoundError as error:
            raise LtriError(
                f"{self.path} is not an ltri span store (it lacks its databases); choose another directory."
            ) from error
        except lmdb.Error as error:
            raise LtriError(f"Could not {action} the span store at {self.path}: {error}.") from error

    def _damaged(self, layer: int, span_id: int, problem: str) -> LtriError:
        where = f"span {span_id} of layer {layer}"
        return LtriError(f"The span store at {self.path} is damaged: {where} {problem}; ingest the text again.")


@dataclass(frozen=True)
class HostCopy:
    """Payloads' raw bytes copied to host memory: one block, pinned when they came from a GPU."""

    data: torch.Tensor  # (total bytes,) uint8 on the host
    sizes: list[int]  # bytes of each payload, in order
    ready: torch.cuda.Event | None  # recorded after the device-to-host copy; None for CPU payloads

    def blobs(self) -> list[np.ndarray]:
        """Each payload's bytes as a flat uint8 array (waits for the copy)."""
        if self.ready is not None:
            self.ready.synchronize()
        return [part.numpy() for part in self.data.split(self.sizes)]


def host_copy(payloads: Sequence[torch.Tensor]) -> HostCopy:
    """Copies of the payloads' bytes on the host, made without waiting for the GPU: one device-to-host copy
    into pinned memory, enqueued on the current stream after the work that made the payloads."""
    flat = [payload.detach().contiguous().reshape(-1).view(torch.uint8) for payload in payloads]
    sizes = [tensor.numel() for tensor in flat]
    joined = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)  # a copy even on the CPU
    if joined.is_cpu:
        return HostCopy(joined, sizes, None)
    host = torch.empty(joined.numel(), dtype=torch.uint8, pin_memory=True)
    host.copy_(joined, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return HostCopy(host, sizes, ready)


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor of any dtype (bfloat16 too) as a writable flat numpy array.

    Host copies go through numpy, a plain single-threaded memcpy: torch's copy_ hands even 100 KB
    copies to its intra-op thread pool, which costs milliseconds when the cores are busy.
    """
    return tensor.view(-1).view(torch.uint8).numpy()
