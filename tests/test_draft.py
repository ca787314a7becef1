"""A draft answer that chooses the reread's evidence, then is forgotten (ltri.draft, RetrievalConfig.draft_tokens).

The anchor: with a budget that retrieves everything and true positions, where tokens sit (window or stored span)
does not change attention, so a session that drafted and forgot gives the next token the same logits as one that
never drafted. With a small budget the question's retrieval state comes back exactly.
"""

import dataclasses

import numpy as np
import pytest
import torch
from support import byte_tokenizer, tiny_llama

import ltri.session
from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.draft import draft_coverage
from ltri.errors import LtriError
from ltri.evidence import most_held_positions
from ltri.reread import reread_start

TEXT_IDS = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(11)).tolist()
QUESTION = "What was it?"


def config(budget: int, draft: int = 0, position_mode: str = "compact", max_len: int = 24) -> LtriConfig:
    return LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=max_len),
        retrieval=RetrievalConfig(
            budget=budget,
            search_k=10**6,
            reread=bool(draft),
            reread_evidence=40 if draft else 0,
            draft_tokens=draft,
            echo_tokens=0,  # the draft alone chooses the evidence
        ),
        position_mode=position_mode,
        chunk_size=100,
    )


def after_question(model, session_config: LtriConfig) -> tuple[Session, torch.Tensor]:
    """A session that read TEXT_IDS and the question, and the logits (vocab,) of the answer's first token."""
    session = Session(model, session_config, tokenizer=byte_tokenizer())
    session.prefill(TEXT_IDS)
    logits = session.prefill(session.question_tokens(QUESTION))
    return session, logits


def test_a_forgotten_draft_leaves_no_trace_in_what_comes_next():
    model = tiny_llama(seed=5)
    plain, logits = after_question(model, config(budget=10**6, position_mode="true"))
    drafted, logits2 = after_question(model, config(budget=10**6, position_mode="true"))
    seen, ids = drafted.cache.tokens_seen, list(drafted.token_ids)
    coverage = draft_coverage(drafted, logits2, 10)
    assert coverage is not None and coverage.shape == (seen,)
    assert drafted.cache.tokens_seen == seen and list(drafted.token_ids) == ids
    for memory in drafted.cache.memories():
        assert memory.tokens_seen == seen
        assert int(memory.window.positions()[-1]) == seen - 1, "the window ends where the question did"
    token = int(torch.argmax(logits))
    assert (plain.forward_token(token) - drafted.forward_token(token)).abs().max().item() < 1e-4


def test_a_draft_gives_back_the_questions_retrieval_state():
    model = tiny_llama(seed=5)
    session, logits = after_question(model, config(budget=48))
    before = [memory.retrieval_state() for memory in session.cache.memories()]
    unsegmented = [memory.n_unsegmented for memory in session.cache.memories()]
    assert draft_coverage(session, logits, 10).sum() > 0
    for memory, state, n in zip(session.cache.memories(), before, unsegmented, strict=True):
        loaded, n_spans, chosen, votes, steps = memory.retrieval_state()
        assert loaded is state[0] and n_spans == state[1] and steps == state[4]
        assert torch.equal(chosen, state[2])
        assert torch.equal(votes[: state[3].numel()], state[3]) and not votes[state[3].numel() :].any()
        assert memory.n_unsegmented == n


def test_with_a_small_budget_the_answer_goes_on_as_if_no_draft_had_run():
    """No span leaves the window during a 3-token draft here, so the answer's steps retrieve among the same spans,
    from the same votes (own, persisted and shared), as a session that never drafted."""
    model = tiny_llama(seed=5)
    plain, logits = after_question(model, config(budget=48))
    drafted, logits2 = after_question(model, config(budget=48))
    n_spans = [memory.n_spans for memory in drafted.cache.memories()]
    draft_coverage(drafted, logits2, 3)
    assert [memory.n_spans for memory in drafted.cache.memories()] == n_spans
    for token in (int(torch.argmax(logits)), 65, 66):
        step, step2 = plain.forward_token(token), drafted.forward_token(token)
        assert (step - step2).abs().max().item() < 1e-5
        for memory, memory2 in zip(plain.cache.memories(), drafted.cache.memories(), strict=True):
            assert torch.equal(memory.last_retrieved, memory2.last_retrieved)
            assert torch.equal(memory.persistence.buffer, memory2.persistence.buffer)
        shared, shared2 = plain.cache.memories()[0].shared, drafted.cache.memories()[0].shared
        assert torch.equal(shared.previous, shared2.previous) and torch.equal(shared.current, shared2.current)


def test_a_draft_stops_before_any_layer_would_cut_it():
    model = tiny_llama(seed=5)
    session, logits = after_question(model, config(budget=48, max_len=24))
    room = min(memory.forgettable_tokens() for memory in session.cache.memories())
    assert 0 < room <= 23  # max_len - 1 after a question cut into spans
    steps = []
    original = session.forward_token
    session.forward_token = lambda token: steps.append(token) or original(token)
    draft_coverage(session, logits, 100)
    assert len(steps) <= room
    with pytest.raises(ValueError, match="unsegmented"):
        session.cache.memories()[0].forget_last(room + 100)


def test_the_drafts_most_held_tokens_are_the_evidence(monkeypatch):
    model = tiny_llama(seed=5)
    calls = []

    def watched(session, logits, n_evidence, coverage=None, *echo):
        calls.append((coverage, reread_start(session.cache.memories()), n_evidence))
        return original(session, logits, n_evidence, coverage, *echo)

    original = ltri.session.reread_window
    monkeypatch.setattr(ltri.session, "reread_window", watched)
    session = Session(model, config(budget=48, draft=12), tokenizer=byte_tokenizer())
    session.prefill(TEXT_IDS)
    n_before = session.cache.tokens_seen + len(session.question_tokens(QUESTION))
    session.ask(QUESTION, max_new_tokens=3)
    ((coverage, start, n_evidence),) = calls
    assert coverage is not None and n_evidence == 40
    expected = most_held_positions(torch.as_tensor(coverage[:start]), n_evidence)
    assert expected.numel() == 40
    for memory in session.cache.memories():
        assert torch.equal(memory.evidence.tokens.positions().cpu(), expected)
    assert session.cache.tokens_seen == n_before + len(session.last_answer_tokens), "the draft is forgotten"


def test_asking_with_a_draft_keeps_the_stream_of_question_and_answer():
    model = tiny_llama(seed=5)
    plain = Session(model, config(budget=48), tokenizer=byte_tokenizer())
    drafted = Session(model, config(budget=48, draft=8), tokenizer=byte_tokenizer())
    for session in (plain, drafted):
        session.prefill(TEXT_IDS)
        n_read = len(TEXT_IDS) + len(session.question_tokens(QUESTION))
        session.ask(QUESTION, max_new_tokens=4)
        assert session.cache.tokens_seen == n_read + len(session.last_answer_tokens)
        session.ask("And then?", max_new_tokens=4)
    assert list(drafted.token_ids[:n_read]) == list(plain.token_ids[:n_read])
    assert drafted.cache.tokens_seen == len(drafted.token_ids)
    assert all(m.tokens_seen == drafted.cache.tokens_seen for m in drafted.cache.memories())


def test_most_held_positions_take_the_highest_counts_later_first_among_equals():
    counts = np.array([0, 2, 1, 1, 3, 0, 1])
    assert most_held_positions(counts, 1).tolist() == [4]
    assert most_held_positions(counts, 3).tolist() == [1, 4, 6]
    assert most_held_positions(counts, 100).tolist() == [1, 2, 3, 4, 6]
    assert most_held_positions(counts, 0).numel() == 0
    assert most_held_positions(np.zeros(5), 3).numel() == 0


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(draft_tokens=-1), "draft_tokens must be 0 or more"),
        (dict(draft_tokens=8, reread=False), "needs reread on and reread_evidence above 0"),
        (dict(draft_tokens=8, reread_evidence=0), "needs reread on and reread_evidence above 0"),
    ],
)
def test_a_draft_without_evidence_to_choose_is_refused_in_one_sentence(fields, message):
    with pytest.raises(LtriError, match=message):
        RetrievalConfig(**fields)
    assert dataclasses.replace(RetrievalConfig(), reread=True, reread_evidence=1, draft_tokens=8).draft_tokens == 8


def test_a_reopened_store_answers_with_a_draft(tmp_path):
    model = tiny_llama(seed=5)
    with Session(model, config(budget=48), tokenizer=byte_tokenizer(), store=tmp_path / "store") as reader:
        reader.prefill(TEXT_IDS)
        reader.save()
    with Session.open(tmp_path / "store", model=model, tokenizer=byte_tokenizer(), config=config(48, draft=8)) as s:
        n_read = len(TEXT_IDS) + len(s.question_tokens(QUESTION))
        s.ask(QUESTION, max_new_tokens=3)
        assert s.cache.tokens_seen == n_read + len(s.last_answer_tokens)
        assert all(m.evidence.length == 40 for m in s.cache.memories())
