"""Reading the window again at a question (ltri.reread, RetrievalConfig.reread).

The anchor: when the question retrieves every span, the window was already encoded with everything in reach,
so reading it again changes nothing (true positions, as in test_span_memory's exactness anchor). With a small
budget it changes the window's keys and values and nothing else: counts, positions, spans.
"""

import dataclasses

import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.reread import reread_start
from ltri.span_memory import SpanMemory

TEXT_IDS = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(11)).tolist()
QUESTION = "What was it?"


def config(budget: int, reread: bool, position_mode: str = "true", evidence: int = 0) -> LtriConfig:
    return LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24),
        retrieval=RetrievalConfig(
            budget=budget, search_k=10**6, reread=reread, reread_evidence=evidence, echo_tokens=0
        ),  # the question's retrieval alone chooses the evidence (tests/test_echo.py: with the echo)
        position_mode=position_mode,
        chunk_size=100,
    )


def question_logits(model, session_config: LtriConfig) -> tuple[torch.Tensor, Session]:
    """The first answer token's logits after reading TEXT_IDS and the question (the session stays open)."""
    session = Session(model, session_config, tokenizer=byte_tokenizer())
    session.prefill(TEXT_IDS)
    captured = []
    original = session._decode

    def first_logits(logits, sampling):
        captured.append(logits)
        return original(logits, sampling)

    session._decode = first_logits
    session.ask(QUESTION, max_new_tokens=1)
    return captured[0], session


def window_state(session: Session) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each layer's window keys, values and positions (copies)."""
    return [
        (m.window.keys().clone(), m.window.values().clone(), m.window.positions().clone())
        for m in session.cache.memories()
    ]


def test_rereading_with_everything_retrieved_changes_nothing():
    model = tiny_llama(seed=5)
    plain, plain_session = question_logits(model, config(budget=10**6, reread=False))
    reread, reread_session = question_logits(model, config(budget=10**6, reread=True))
    assert reread_start(reread_session.cache.memories()) is not None, "the text must have left the window"
    assert (plain - reread).abs().max().item() < 1e-4
    for (keys, values, positions), (keys2, values2, positions2) in zip(
        window_state(plain_session), window_state(reread_session), strict=True
    ):
        assert torch.equal(positions, positions2)
        assert (keys - keys2).abs().max().item() < 1e-4 and (values - values2).abs().max().item() < 1e-4


@pytest.mark.parametrize("position_mode", ["compact", "true"])
def test_rereading_with_a_small_budget_changes_only_the_windows_keys_and_values(position_mode):
    model = tiny_llama(seed=5)
    plain, plain_session = question_logits(model, config(budget=48, reread=False, position_mode=position_mode))
    reread, reread_session = question_logits(model, config(budget=48, reread=True, position_mode=position_mode))
    assert (plain - reread).abs().max().item() > 1e-3, "the question's spans are not all the text: answers differ"
    assert reread_session.cache.tokens_seen == plain_session.cache.tokens_seen
    assert reread_session.token_ids == plain_session.token_ids
    changed = 0
    for plain_memory, reread_memory, (keys, _, positions), (keys2, _, positions2) in zip(
        plain_session.cache.memories(),
        reread_session.cache.memories(),
        window_state(plain_session),
        window_state(reread_session),
        strict=True,
    ):
        assert torch.equal(positions, positions2)
        assert torch.equal(plain_memory.span_starts, reread_memory.span_starts)
        assert reread_memory.rereading_from is None
        changed += int((keys - keys2).abs().max().item() > 1e-4)
    assert changed > 0, "deeper layers' window keys depend on what they attended to"


def test_rereading_is_skipped_where_it_cannot_help():
    model = tiny_llama(seed=5)
    short = Session(model, config(budget=48, reread=True), tokenizer=byte_tokenizer())
    short.prefill(TEXT_IDS[:40])  # nothing has left the window yet
    assert reread_start(short.cache.memories()) is None
    assert short.ask(QUESTION, max_new_tokens=2) is not None
    full = dataclasses.replace(config(budget=48, reread=True), memory=MemoryConfig(policy="full"))
    assert reread_start(Session(model, full, tokenizer=byte_tokenizer()).cache.memories()) is None
    assert all(isinstance(m, SpanMemory) for m in short.cache.memories())


@pytest.mark.parametrize("position_mode", ["compact", "true", "one_angle"])
def test_evidence_is_read_with_the_window_kept_for_the_answer_and_forgotten_after(position_mode):
    model = tiny_llama(seed=5)
    _, session = question_logits(model, config(budget=48, reread=True, position_mode=position_mode, evidence=40))
    seen = session.cache.tokens_seen
    for memory in session.cache.memories():
        evidence = memory.evidence.tokens.positions()
        assert evidence.numel() == 40 and torch.equal(evidence, evidence.sort().values)
        assert int(evidence.max()) < int(memory.window.positions()[0]), "evidence comes from stored spans"
    memory = session.cache.memories()[1]
    with torch.inference_mode():  # as the Session runs its forwards (votes are updated in place)
        resident = memory.resident(torch.randn(1, 4, 1, 16))  # a decode step's queries: no repeats
    assert resident.positions.unique().numel() == resident.positions.numel()
    assert resident.layout.n_retrieved >= 40
    first = [m.evidence.tokens.positions().clone() for m in session.cache.memories()]
    session.ask("And where?", max_new_tokens=2)
    assert session.cache.tokens_seen > seen
    assert all(m.evidence.length == 40 for m in session.cache.memories())
    now = [m.evidence.tokens.positions() for m in session.cache.memories()]
    assert any(not torch.equal(a, b) for a, b in zip(first, now, strict=True)), "the new question's evidence"
    session.feed("More text.")
    assert all(m.evidence.length == 0 for m in session.cache.memories()), "reading on forgets the answer's evidence"


def test_negative_evidence_is_refused_in_one_sentence():
    from ltri.errors import LtriError

    with pytest.raises(LtriError, match="reread_evidence must be 0 or more"):
        RetrievalConfig(reread_evidence=-1)


def test_agreed_positions_count_the_layers_holding_each_position():
    from types import SimpleNamespace

    from ltri.evidence import agreed_positions

    def layer(starts, lengths, chosen):
        starts, lengths, chosen = torch.tensor(starts), torch.tensor(lengths), torch.tensor(chosen, dtype=torch.long)
        return SimpleNamespace(span_starts=starts, span_lengths=lengths, last_retrieved=chosen)

    memories = [layer([0, 4, 10], [4, 6, 5], [1, 2]), layer([2, 6, 12], [4, 6, 5], [0, 2])]
    # layer 0 holds 4..9 and 10..14, layer 1 holds 2..5 and 12..16: before 12, positions 4 and 5 count 2,
    # 2-3 and 6-11 count 1, 0-1 count 0
    assert agreed_positions(memories, before=12, n_tokens=2).tolist() == [4, 5]
    assert agreed_positions(memories, before=12, n_tokens=3).tolist() == [4, 5, 11]  # ties: the later position
    assert agreed_positions(memories, before=12, n_tokens=100).tolist() == list(range(2, 12))
    assert agreed_positions(memories, before=12, n_tokens=0).numel() == 0
    assert agreed_positions([layer([0], [4], [])], before=12, n_tokens=5).numel() == 0
