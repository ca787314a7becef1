"""A closed session gives its memory back at once: the pinned host rows of a grid of sessions (the needle
harness opens one a cell) must not wait for the garbage collector."""

import gc
import weakref

import torch
from support import byte_tokenizer, resident_bytes, tiny_llama

from ltri import LtriConfig, MemoryConfig, Session, SpanConfig
from ltri.offload.host_payloads import HostPayloads

ROWS_CONFIG = LtriConfig(
    memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64, host_payloads="always"),
    spans=SpanConfig(min_len=4, max_len=24),
    position_mode="true",
    chunk_size=100,
)


def test_a_closed_session_is_freed_without_the_garbage_collector():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    gc.collect()
    gc.disable()
    try:
        session = Session(model, ROWS_CONFIG, tokenizer=byte_tokenizer())
        session.prefill(ids)
        memories = session.cache.memories()
        assert all(memory.host_payloads is not None and memory.host_payloads.length > 0 for memory in memories)
        memory_refs = [weakref.ref(memory) for memory in memories]
        rows_refs = [weakref.ref(memory.host_payloads) for memory in memories]
        del memories
        session.close()
        assert all(ref().host_payloads is None for ref in memory_refs), "close gives the rows back"
        assert all(ref() is None for ref in rows_refs)
        del session
        assert all(ref() is None for ref in memory_refs), "nothing but the collector would free the memories"
    finally:
        gc.enable()


def test_a_reset_session_gives_back_the_rows_of_what_it_forgets():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(4)).tolist()
    with Session(model, ROWS_CONFIG, tokenizer=byte_tokenizer()) as session:
        session.prefill(ids)
        rows = [memory.host_payloads for memory in session.cache.memories()]
        session.reset()
        assert all(row.length == 0 for row in rows)
        session.prefill(ids)  # the new memories read as before
        assert session.stats().spans > 0


def test_closed_host_rows_give_their_pages_back_to_the_host():
    rows = HostPayloads(8, 128, torch.float32, "cpu", max_tokens=1 << 16)  # 8 KB a token
    block = torch.ones(8, 8192, 128)  # 8192 tokens: 64 MB of rows
    rows.append(block, block)
    assert rows.nbytes() == 64 * 2**20
    before = resident_bytes()
    rows.close()
    assert before - resident_bytes() > 48 * 2**20
    assert rows.nbytes() == 0
    assert rows.tokens[:8192].abs().sum().item() == 0  # the pages read as new ones
    rows.close()  # a second close does nothing


def test_each_layer_starts_locking_its_rows_before_its_first_append(monkeypatch):
    events = []
    lock_ahead, append = HostPayloads.lock_ahead, HostPayloads.append
    monkeypatch.setattr(HostPayloads, "lock_ahead", lambda rows: events.append(("ahead", id(rows))) or lock_ahead(rows))
    monkeypatch.setattr(
        HostPayloads, "append", lambda rows, *a: events.append(("append", id(rows))) or append(rows, *a)
    )
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    with Session(tiny_llama(seed=2), ROWS_CONFIG, tokenizer=byte_tokenizer()) as session:
        session.prefill(ids)
        rows = [id(memory.host_payloads) for memory in session.cache.memories()]
        assert all(memory.host_payloads.length > 0 for memory in session.cache.memories())
    assert sorted(rows) == sorted(key for kind, key in events if kind == "ahead")  # once a layer
    for key in rows:
        first_append = events.index(("append", key))
        assert events.index(("ahead", key)) < first_append
