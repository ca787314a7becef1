"""The LMDB span store: bit-exact round trips, damage and crash detection, copies, staging buffers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import torch

import ltri
from ltri.errors import LtriError
from ltri.offload import SpanStore, StagingPool
from ltri.offload.span_store import span_key

SHAPE = (2, 3, 16, 8)  # (2, nheads_kv, span_len, headdim)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def payload(span_id: int, dtype: torch.dtype = torch.float16, shape=SHAPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(span_id)
    return torch.randn(shape, generator=generator).to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def flip_byte(path: Path, layer: int, span_id: int, offset: int = 10) -> None:
    """Rewrites one stored payload with one byte flipped, behind the store's back."""
    env = lmdb.open(str(path), max_dbs=3)
    payloads = env.open_db(b"payloads")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(span_key(layer, span_id), db=payloads))
        value[offset] ^= 0xFF
        txn.put(span_key(layer, span_id), bytes(value), db=payloads)
    env.close()


@pytest.fixture(params=[False, True], ids=["sync", "background"])
def store(tmp_path, request):
    with SpanStore(tmp_path / "store", background_writes=request.param) as opened:
        yield opened


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(store, dtype):
    payloads = [payload(span_id, dtype) for span_id in range(4)]
    payloads[0].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    store.put_spans(1, [10, 11, 12, 13], payloads)
    read = store.read_spans(1, [12, 10, 13, 11], [SHAPE] * 4, dtype, "cpu")
    for got, expected in zip(read, [payloads[2], payloads[0], payloads[3], payloads[1]], strict=True):
        assert bits_equal(got, expected)


def test_non_contiguous_payload_is_stored_as_its_values(store):
    wide = payload(3, torch.float32, shape=(2, 3, 8, 16))
    store.put_spans(0, [3], [wide.transpose(2, 3)])
    (read,) = store.read_spans(0, [3], [(2, 3, 16, 8)], torch.float32, "cpu")
    assert bits_equal(read, wide.transpose(2, 3).contiguous())


def test_many_spans_in_one_transaction_and_layers_kept_apart(store):
    span_ids = list(range(0, 4000, 2))
    store.put_spans(5, span_ids, [payload(span_id) for span_id in span_ids])
    store.put_spans(6, [0], [payload(999)])
    read = store.read_spans(5, span_ids, [SHAPE] * len(span_ids), torch.float16, "cpu")
    assert all(bits_equal(got, payload(span_id)) for got, span_id in zip(read, span_ids, strict=True))
    assert bits_equal(store.read_spans(6, [0], [SHAPE], torch.float16, "cpu")[0], payload(999))
    assert store.span_ids(5) == span_ids and store.span_ids(6) == [0] and store.span_ids(7) == []
    assert store.nbytes() == (len(span_ids) + 1) * payload(0).nbytes
    store.verify()


def test_flipped_byte_is_reported_by_read_and_verify(tmp_path):
    path = tmp_path / "store"
    with SpanStore(path) as store:
        store.put_spans(2, [6, 7, 8], [payload(6), payload(7), payload(8)])
    flip_byte(path, layer=2, span_id=7)
    with SpanStore(path) as store:
        assert bits_equal(store.read_spans(2, [6], [SHAPE], torch.float16, "cpu")[0], payload(6))
        with pytest.raises(LtriError, match=r"is damaged: span 7 of layer 2 fails its checksum; ingest the text"):
            store.read_spans(2, [6, 7], [SHAPE] * 2, torch.float16, "cpu")
        with pytest.raises(LtriError, match="span 7 of layer 2 fails its checksum"):
            store.verify()


def test_missing_span_is_reported(tmp_path, store):
    store.put_spans(0, [1], [payload(1)])
    with pytest.raises(LtriError, match="span 2 of layer 0 is missing"):
        store.read_spans(0, [1, 2], [SHAPE] * 2, torch.float16, "cpu")
    with pytest.raises(LtriError, match="span 1 of layer 3 is missing"):
        store.read_spans(3, [1], [SHAPE], torch.float16, "cpu")


def test_payload_deleted_behind_the_store_is_found_by_verify(tmp_path):
    path = tmp_path / "store"
    with SpanStore(path) as store:
        store.put_spans(0, [1, 2], [payload(1), payload(2)])
    env = lmdb.open(str(path), max_dbs=3)
    with env.begin(write=True) as txn:
        txn.delete(span_key(0, 2), db=env.open_db(b"payloads", txn=txn))
    env.close()
    with SpanStore(path, readonly=True) as store, pytest.raises(LtriError, match="span 2 of layer 0 is missing"):
        store.verify()


def test_wrong_shape_asked_is_reported(store):
    store.put_spans(0, [1], [payload(1)])
    with pytest.raises(LtriError, match="holds 1536 bytes where 768 were expected"):
        store.read_spans(0, [1], [(2, 3, 8, 8)], torch.float16, "cpu")


def test_readonly_reopen(tmp_path):
    path = tmp_path / "store"
    with SpanStore(path) as store:
        store.put_spans(0, [1, 2], [payload(1), payload(2)])
        store.flush()
        digest = store.digest()
    with SpanStore(path, readonly=True) as store:
        assert bits_equal(store.read_spans(0, [2], [SHAPE], torch.float16, "cpu")[0], payload(2))
        assert store.digest() == digest
        store.verify()
        with pytest.raises(LtriError):
            store.put_spans(0, [3], [payload(3)])


def test_opening_what_is_not_a_store(tmp_path):
    with pytest.raises(LtriError, match="There is no span store"):
        SpanStore(tmp_path / "nothing", readonly=True)
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign))
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else")
    env.close()
    for readonly in (False, True):
        with pytest.raises(LtriError, match="not an ltri span store"):
            SpanStore(foreign, readonly=readonly)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LtriError, match="is a file"):
        SpanStore(tmp_path / "file")


def test_a_path_is_open_once_per_process(tmp_path, store):
    with pytest.raises(RuntimeError, match="already open"):
        SpanStore(store.path)
    store.close()
    reopened = SpanStore(store.path)
    del reopened  # forgotten without close(): garbage collected, it no longer holds the path
    SpanStore(store.path).close()


def test_digest_follows_payloads(store):
    store.put_spans(0, [1, 2], [payload(1), payload(2)])
    before = store.digest()
    store.put_spans(0, [2], [payload(3)])
    changed = store.digest()
    store.put_spans(0, [2], [payload(2)])
    assert changed != before and store.digest() == before


def test_copy_to_gives_an_equal_store(tmp_path, store):
    span_ids = list(range(50))
    store.put_spans(0, span_ids, [payload(span_id) for span_id in span_ids])
    store.put_spans(0, span_ids[:10], [payload(100 + span_id) for span_id in span_ids[:10]])  # leaves free pages
    store.copy_to(tmp_path / "copy")
    with SpanStore(tmp_path / "copy", readonly=True) as copy:
        assert copy.digest() == store.digest() and copy.nbytes() == store.nbytes()
        copy.verify()
        read = copy.read_spans(0, span_ids, [SHAPE] * 50, torch.float16, "cpu")
        assert all(
            bits_equal(got, payload(span_id + (100 if span_id < 10 else 0)))
            for got, span_id in zip(read, span_ids, strict=True)
        )
    with pytest.raises(LtriError, match="not empty"):
        store.copy_to(tmp_path / "copy")


WRITER = """
import sys, torch
from ltri.offload.span_store import SpanStore

BASE = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)).half()

def payload(span_id):  # cheap to make, so the writer spends its time inside LMDB transactions
    made = BASE.clone()
    made.view(torch.int16).view(-1)[:3] = torch.tensor([span_id, span_id >> 15, -1], dtype=torch.int16)
    return made

store = SpanStore(sys.argv[1])
batch = 0
while True:
    span_ids = list(range(batch * 8, batch * 8 + 8))
    store.put_spans(0, span_ids, [payload(span_id) for span_id in span_ids])
    print(batch, flush=True)
    batch += 1
"""


def test_committed_batches_survive_sigkill(tmp_path):
    """A writer killed at an arbitrary point, mostly inside a transaction: every batch it reported as
    committed must read back intact, at most one more may exist, and the store must reopen."""
    path = tmp_path / "store"
    paths = [str(Path(ltri.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        for _ in range(20):
            if not writer.stdout.readline():
                break
        time.sleep(0.01)  # some dozen more batches: the kill lands at an arbitrary point of one
    finally:
        writer.send_signal(signal.SIGKILL)
        stdout, stderr = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, stderr
    n_reported = 20 + len(stdout.split())
    namespace: dict = {}
    exec(WRITER.split("store = ")[0], namespace)  # the writer's payload()
    with SpanStore(path, readonly=True) as store:
        stored = store.span_ids(0)
        assert stored == list(range(len(stored))) and len(stored) // 8 in (n_reported, n_reported + 1)
        read = store.read_spans(0, stored, [(2, 4, 64, 64)] * len(stored), torch.float16, "cpu")
        assert all(bits_equal(got, namespace["payload"](span_id)) for got, span_id in zip(read, stored, strict=True))
        store.verify()
    with SpanStore(path) as store:  # a new writer takes over after the crash
        store.put_spans(0, [10**6], [payload(1)])
        assert store.span_ids(0)[-1] == 10**6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_payloads_round_trip(store):
    payloads = [payload(span_id, torch.bfloat16).cuda() for span_id in range(6)]
    store.put_spans(0, range(6), payloads)
    for _ in range(3):  # reuses the staging buffers
        read = store.read_spans(0, [5, 0, 3], [SHAPE] * 3, torch.bfloat16, "cuda")
        assert all(got.is_cuda for got in read)
        assert all(bits_equal(got, payloads[span_id]) for got, span_id in zip(read, [5, 0, 3], strict=True))


def test_staging_pool_grows_and_reuses():
    pool = StagingPool(n_buffers=2, pin=False)
    first, view = pool.acquire(1000)
    assert view.numel() == 1000 and view.dtype == torch.uint8 and not view.is_pinned()
    second, _ = pool.acquire(10)
    assert second is not first
    again, small = pool.acquire(500)
    assert again is first and small.data_ptr() == view.data_ptr()
    pool.acquire(10)
    _, large = pool.acquire(5000)
    assert large.numel() == 5000 and pool.nbytes() >= 5000 + 16
