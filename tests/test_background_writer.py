"""Span writes on a background thread: in order, waited for by the reads that need them, errors not lost."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from ltri.errors import LtriError
from ltri.offload import SpanStore
from ltri.offload.background_writer import BackgroundWriter

SHAPE = (2, 2, 8, 4)


def test_jobs_run_in_order_and_a_wait_covers_only_the_jobs_holding_the_spans():
    writer, done, release = BackgroundWriter(), [], threading.Event()

    def blocked_job():
        release.wait(timeout=30)
        done.append("layer 1")

    writer.submit(lambda: done.append("layer 0"), layer=0, span_ids=[0, 1])
    writer.submit(blocked_job, layer=1, span_ids=[0, 1, 2])
    writer.wait_for(0, [1])
    assert done == ["layer 0"]
    writer.wait_for(1, [7])  # no job holds span 7 of layer 1: no wait for the blocked job
    assert done == ["layer 0"]
    release.set()
    writer.wait_for(1, [2])
    assert done == ["layer 0", "layer 1"]
    writer.close()


def test_a_failed_job_raises_in_the_callers_thread():
    writer = BackgroundWriter()

    def failing():
        raise LtriError("The span store is full.")

    writer.submit(failing, layer=0, span_ids=[0])
    with pytest.raises(LtriError, match="full"):
        writer.drain()
    writer.close()


def test_submit_waits_when_too_many_jobs_are_queued():
    writer, release = BackgroundWriter(max_pending=2), threading.Event()
    writer.submit(lambda: release.wait(timeout=30), layer=0, span_ids=[0])
    writer.submit(lambda: None, layer=0, span_ids=[1])
    submitted = threading.Event()
    thread = threading.Thread(target=lambda: (writer.submit(lambda: None, 0, [2]), submitted.set()))
    thread.start()
    assert not submitted.wait(timeout=0.3), "a third job waits while two are queued"
    release.set()
    assert submitted.wait(timeout=30)
    thread.join()
    writer.close()


def test_background_store_keeps_the_payload_as_it_was_when_put(tmp_path):
    payload = torch.arange(torch.Size(SHAPE).numel(), dtype=torch.float32).view(SHAPE)
    expected = payload.clone()
    with SpanStore(tmp_path / "store", background_writes=True) as store:
        store.put_spans(0, [0], [payload])
        payload.zero_()  # the caller reuses its buffer at once
        (read,) = store.read_spans(0, [0], [SHAPE], torch.float32, "cpu")
        assert torch.equal(read, expected)
        store.verify()


def test_background_store_full_is_reported_and_keeps_what_was_written(tmp_path):
    big = torch.zeros(2, 8, 256, 64)  # 1 MiB a span
    store = SpanStore(tmp_path / "store", map_size=4 << 20, background_writes=True)
    store.put_spans(0, [0], [big[:, :, :16]])
    store.flush()
    with pytest.raises(LtriError, match="full"):
        for span_id in range(1, 20):
            store.put_spans(0, [span_id], [big])
        store.flush()
    with contextlib.suppress(LtriError):  # a write still queued fails the same way, when the store closes
        store.close()
    with SpanStore(tmp_path / "store", readonly=True) as reopened:
        assert 0 in reopened.span_ids(0)
        reopened.verify()
