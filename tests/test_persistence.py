"""Saving and reopening a session's store: same answers without re-reading, and every bad store refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, LtriError, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.filler import filler_text
from ltri.store_cache import store_key
from ltri.store_files import stored_fields

CONFIG = LtriConfig(
    memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
    spans=SpanConfig(min_len=4, max_len=24),
    retrieval=RetrievalConfig(budget=96, search_k=16),
    chunk_size=50,
)
TEXT = filler_text(30, seed=2)


def new_session(store=None, seed=0, config=CONFIG) -> Session:
    return Session(tiny_llama(seed=seed), config, tokenizer=byte_tokenizer(), store=store)


def reopen(path, seed=0, **kwargs) -> Session:
    return Session.open(path, model=tiny_llama(seed=seed), tokenizer=byte_tokenizer(), **kwargs)


@pytest.fixture()
def saved(tmp_path) -> tuple[Path, torch.Tensor]:
    """A store saved after TEXT, and the logits the original session gives next for a probe."""
    store = tmp_path / "store"
    session = new_session(store)
    session.feed(TEXT)
    session.save()
    expected = session.prefill(list(b"probe question?"), all_logits=True)
    session.close()
    return store, expected


def test_reopened_store_continues_exactly_where_the_saved_one_was(saved):
    store, expected = saved
    with reopen(store, verify=True) as session:
        assert session.stats().spans > 0
        got = session.prefill(list(b"probe question?"), all_logits=True)
    assert torch.equal(got, expected)


def test_save_to_another_directory_makes_a_compact_copy(tmp_path):
    session = new_session()  # temporary store
    session.feed(TEXT)
    copy = session.save(tmp_path / "copy")
    expected = session.prefill(list(b"probe"), all_logits=True)
    session.close()
    with reopen(copy) as reopened:
        assert torch.equal(reopened.prefill(list(b"probe"), all_logits=True), expected)


def test_answering_after_reopen_does_not_change_what_was_saved(saved):
    store, expected = saved
    with reopen(store) as session:
        session.feed(filler_text(10, seed=9))  # new spans go to the same LMDB under new ids
    with reopen(store, verify=True) as session:
        assert torch.equal(session.prefill(list(b"probe question?"), all_logits=True), expected)


def test_a_store_of_another_model_is_refused(saved):
    store, _ = saved
    with pytest.raises(LtriError, match="another model"):
        reopen(store, seed=1)


def test_other_memory_settings_are_refused_but_retrieval_settings_may_change(saved):
    store, _ = saved
    other = LtriConfig(memory=MemoryConfig(policy="ltri", n_sink=8, n_window=128), spans=CONFIG.spans)
    with pytest.raises(LtriError, match="other memory or span settings"):
        reopen(store, config=other)
    wider = LtriConfig(memory=CONFIG.memory, spans=CONFIG.spans, retrieval=RetrievalConfig(budget=500))
    with reopen(store, config=wider) as session:
        assert session.config.retrieval.budget == 500
    uncached = LtriConfig(memory=replace(CONFIG.memory, row_cache=False), spans=CONFIG.spans)  # how steps run
    with reopen(store, config=uncached) as session:
        assert not session.config.memory.row_cache


def test_the_row_cache_setting_leaves_the_store_cache_key_alone():
    without = replace(CONFIG, memory=replace(CONFIG.memory, row_cache=False))
    assert store_key("text", None, without, None) == store_key("text", None, CONFIG, None)
    assert "row_cache" not in stored_fields(CONFIG)["memory"]  # keys of stores made before the setting stay


def test_a_flipped_payload_byte_is_reported(saved):
    store, _ = saved
    env = lmdb.open(str(store / "spans"), max_dbs=8)
    payloads = env.open_db(b"payloads")
    with env.begin(write=True, db=payloads) as txn:
        key, value = next(iter(txn.cursor()))
        damaged = bytearray(value)
        damaged[len(damaged) // 2] ^= 0x01
        txn.put(key, bytes(damaged))
    env.close()
    with pytest.raises(LtriError, match="damaged"):
        reopen(store, verify=True)


def test_a_damaged_state_file_is_reported(saved):
    store, _ = saved
    state = store / "state.pt"
    data = bytearray(state.read_bytes())
    data[100] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(LtriError, match="damaged"):
        reopen(store)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "not an ltri store"),
        (lambda d: (d.mkdir(), (d / "meta.json").write_text("{not json")), "damaged"),
        (lambda d: (d.mkdir(), (d / "meta.json").write_text(json.dumps({"format": "other"}))), "not an ltri store"),
    ],
)
def test_what_is_not_a_store_is_refused(tmp_path, make, message):
    make(tmp_path / "store")
    with pytest.raises(LtriError, match=message):
        reopen(tmp_path / "store")


def test_a_new_store_never_overwrites_a_directory_with_files(saved):
    store, _ = saved
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(LtriError, match="not an empty directory"):
        new_session(store)
    assert sorted(p.name for p in store.iterdir()) == before
    with reopen(store) as session:
        assert session.stats().spans > 0


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from support import byte_tokenizer, tiny_llama
    from ltri import Session
    from ltri.filler import filler_text
    import test_persistence as t

    session = Session(tiny_llama(), t.CONFIG, tokenizer=byte_tokenizer(), store={store!r})
    while True:
        session.feed(filler_text(5, seed=1))
        print("fed", flush=True)
    """
)


def test_a_writer_killed_mid_ingest_leaves_a_store_reported_incomplete(tmp_path):
    store = tmp_path / "store"
    code = WRITER.format(tests=str(Path(__file__).parent), store=str(store))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for _ in range(3):
            assert writer.stdout.readline().startswith("fed")
        time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    with pytest.raises(LtriError, match="incomplete"):
        reopen(store)
