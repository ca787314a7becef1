"""What `ltri chat` needs from Session: the token ids kept and saved, the spans an answer used, rewind."""

from itertools import pairwise

import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, LtriError, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.filler import filler_text

CONFIG = LtriConfig(
    memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
    spans=SpanConfig(min_len=4, max_len=24),
    retrieval=RetrievalConfig(budget=96, search_k=16),
    chunk_size=50,
)
TEXT = filler_text(20, seed=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from threads, and on a shared machine they only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def new_session(config=CONFIG, store=None) -> Session:
    return Session(tiny_llama(), config, tokenizer=byte_tokenizer(), store=store)


def test_the_session_keeps_every_token_it_fed_and_saves_them(tmp_path):
    with new_session(store=tmp_path / "store") as session:
        session.feed(TEXT)
        session.ask("Who?", max_new_tokens=5)
        assert len(session.token_ids) == session.stats().tokens_seen
        assert TEXT in session.tokenizer.decode(session.token_ids.tolist())
        kept = session.token_ids.tolist()
        session.save()
    with Session.open(tmp_path / "store", model=tiny_llama(), tokenizer=byte_tokenizer()) as reopened:
        assert reopened.token_ids.tolist() == kept


def test_retrieved_spans_name_stored_text_the_last_answer_attended_to():
    with new_session() as session:
        session.feed(TEXT)
        assert session.retrieved_spans() == []
        session.ask("Where did Mara go?", max_new_tokens=4)
        spans = session.retrieved_spans(limit=5)
        assert 0 < len(spans) <= 5
        assert [s.coverage for s in spans] == sorted((s.coverage for s in spans), reverse=True)
        ends = sorted((s.start, s.start + s.length) for s in spans)
        assert all(end <= next_start for (_, end), (next_start, _) in pairwise(ends))  # no overlaps
        for span in spans:
            assert span.text and span.text in TEXT
            assert span.start + span.length <= session.stats().tokens_seen


def test_a_memory_without_spans_retrieves_none():
    full = LtriConfig(memory=MemoryConfig(policy="full"))
    with new_session(full) as session:
        session.feed(TEXT)
        session.ask("Who?", max_new_tokens=3)
        assert session.retrieved_spans() == []


def test_rewind_forgets_the_conversation_and_keeps_the_text(tmp_path):
    with new_session(store=tmp_path / "store") as session:
        session.feed(TEXT)
        session.save()
        saved_tokens, saved_spans = session.stats().tokens_seen, session.stats().spans
        first = session.ask("Where did Mara go?", max_new_tokens=8)
        session.ask("And then? " * 30, max_new_tokens=8)  # long enough to store new spans
        assert session.stats().spans > saved_spans
        session.rewind()
        assert (session.stats().tokens_seen, session.stats().spans) == (saved_tokens, saved_spans)
        assert len(session.token_ids) == saved_tokens
        assert session.ask("Where did Mara go?", max_new_tokens=8) == first


def test_rewind_of_a_temporary_store_keeps_it_and_refuses_without_a_save():
    with new_session() as session:
        session.feed(TEXT)
        with pytest.raises(LtriError, match="incomplete"):
            session.rewind()  # the temporary store was never saved
        session.save()
        first = session.ask("Who?", max_new_tokens=6)
        session.rewind()
        assert session.store_path.is_dir()
        assert session.ask("Who?", max_new_tokens=6) == first
