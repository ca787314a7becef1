"""The echo: evidence around where a question's own words recur in the text (ltri.echo, RetrievalConfig.echo_tokens)."""

import math

import numpy as np
import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.echo import ECHO_AFTER, ECHO_BEFORE, echo_positions, heaviest_runs, rarity, run_reach
from ltri.errors import LtriError
from ltri.evidence import agreed_counts, most_held_positions
from ltri.reread import evidence_positions, reread_start

PHRASE = "zebra quartz"
QUESTION = f"Where was the {PHRASE}?"


def test_rarity_is_the_log_of_how_rare_each_token_is():
    weights = rarity(np.array([7, 7, 7, 3]))
    assert weights[7] == pytest.approx(math.log(4 / 3)) and weights[3] == pytest.approx(math.log(4))


def test_the_heaviest_run_ending_at_each_position_sums_its_tokens_rarity():
    text = np.array([5, 1, 2, 3, 9, 1, 2, 7, 1, 2, 3, 4])
    weights, lengths = heaviest_runs(text, np.array([1, 2, 3, 4]))
    w = rarity(text)
    assert lengths.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert weights[11] == pytest.approx(w[1] + w[2] + w[3] + w[4])
    assert weights[6] == pytest.approx(w[1] + w[2]) and weights[0] == 0 and weights[7] == 0


def test_a_run_follows_the_questions_order():
    weights, lengths = heaviest_runs(np.array([2, 1, 9, 9]), np.array([1, 2]))
    assert lengths.tolist() == [1, 1, 0, 0], "2 then 1 is no run of the question 1 then 2"
    assert (weights[:2] > 0).all()


def test_the_echo_holds_the_heaviest_run_with_its_reach_then_the_next():
    text = np.array([5, 1, 2, 3, 9, 1, 2, 7, 1, 2, 3, 4])
    question = np.array([1, 2, 3, 4])
    assert echo_positions(text, question, 4, before=0, after=0).tolist() == [8, 9, 10, 11]
    assert echo_positions(text, question, 6, before=1, after=1).tolist() == [1, 7, 8, 9, 10, 11]
    assert echo_positions(text, question, 3, before=0, after=0).tolist() == [8, 9, 10], "cut at the quota"
    assert echo_positions(text, question, 6, before=2, after=1).tolist() == [6, 7, 8, 9, 10, 11], "the text's end"
    assert echo_positions(text, question, 7, before=3, after=0).tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert echo_positions(text, question, 0).numel() == 0
    assert echo_positions(text, np.array([42]), 10).numel() == 0, "no question token recurs"
    assert echo_positions(np.array([], dtype=np.int64), question, 10).numel() == 0


def test_a_quota_takes_the_run_then_what_follows_then_what_precedes():
    assert run_reach(5, 7, 20, before=2, after=3).tolist() == [5, 6, 7, 8, 9, 4, 3]
    assert run_reach(1, 2, 3, before=4, after=4).tolist() == [1, 2, 0]


def test_equal_runs_go_to_the_later_one():
    text = np.array([1, 2, 0, 0, 0, 1, 2, 0, 0])
    assert echo_positions(text, np.array([1, 2]), 2, before=0, after=0).tolist() == [5, 6]


def text_with_phrase(at: int, n: int = 700) -> list[int]:
    """n random byte tokens, none of the question's, with PHRASE's tokens at position at."""
    tokenizer = byte_tokenizer()
    question = set(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    others = torch.tensor([token for token in range(256) if token not in question])
    ids = others[torch.randint(0, others.numel(), (n,), generator=torch.Generator().manual_seed(3))].tolist()
    phrase = tokenizer(PHRASE, add_special_tokens=False)["input_ids"]
    ids[at : at + len(phrase)] = phrase
    return ids


def config(evidence: int, echo: int) -> LtriConfig:
    return LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24),
        retrieval=RetrievalConfig(budget=48, reread=True, reread_evidence=evidence, echo_tokens=echo),
        chunk_size=100,
    )


def test_a_question_rereads_the_text_around_its_own_words():
    at = 300
    session = Session(tiny_llama(seed=5), config(evidence=200, echo=200), tokenizer=byte_tokenizer())
    session.prefill(text_with_phrase(at))
    session.ask(QUESTION, max_new_tokens=3)
    around_phrase = torch.arange(at - ECHO_BEFORE, at + len(PHRASE) + ECHO_AFTER)  # 140 tokens
    for memory in session.cache.memories():
        evidence = memory.evidence.tokens.positions().cpu()
        assert around_phrase.numel() < evidence.numel() <= 200, "the retrieval's agreement fills what the echo left"
        assert torch.isin(around_phrase, evidence).all()


def test_the_echo_comes_first_and_the_retrievals_agreement_fills_the_rest():
    session = Session(tiny_llama(seed=5), config(evidence=80, echo=30), tokenizer=byte_tokenizer())
    session.prefill(text_with_phrase(300))
    session.prefill(session.question_tokens(QUESTION))
    memories = session.cache.memories()
    start = reread_start(memories)
    question_ids = session.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    evidence = evidence_positions(session, memories, start, 80, None, question_ids, 30)
    echo = echo_positions(session.token_ids[:start], question_ids, 30)
    counts = agreed_counts(memories, start)
    counts[echo] = 0
    assert echo.numel() == 30 and 30 < evidence.numel() <= 80
    assert set(range(300, 300 + len(PHRASE))) <= set(echo.tolist()), "the run first"
    assert torch.isin(echo, evidence).all()
    assert torch.equal(evidence, torch.cat([echo, most_held_positions(counts, 50)]).sort().values)


def test_a_negative_echo_is_refused_in_one_sentence():
    with pytest.raises(LtriError, match="echo_tokens must be 0 or more tokens"):
        RetrievalConfig(echo_tokens=-1)
    # without a reread, or past its evidence, the echo has no effect: no error (the defaults set it, a user who
    # turns the reread off or shrinks its evidence need not also unset it)
    assert RetrievalConfig(reread=False, reread_evidence=0, echo_tokens=8).echo_tokens == 8


def test_the_echo_takes_no_more_than_the_evidence():
    session = Session(tiny_llama(seed=5), config(evidence=20, echo=64), tokenizer=byte_tokenizer())
    session.prefill(text_with_phrase(300))
    session.prefill(session.question_tokens(QUESTION))
    memories = session.cache.memories()
    question_ids = session.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    evidence = evidence_positions(session, memories, reread_start(memories), 20, None, question_ids, 64)
    assert evidence.numel() == 20 and set(range(300, 300 + len(PHRASE))) <= set(evidence.tolist())


def test_the_needle_script_takes_the_echo():
    from ltri.needle.command import parse_args

    run = parse_args(["--lengths", "1k", "--out", "x", "--reread", "--reread-evidence", "64", "--echo-tokens", "32"])
    assert run.ltri_config("ltri").retrieval.echo_tokens == 32
