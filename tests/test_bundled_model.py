"""The bundled SmolLM2 on the CPU: ltri's full policy answers exactly as transformers' generate."""

import torch

from ltri import LtriConfig, MemoryConfig, Session
from ltri.chat_format import ChatFormat
from ltri.filler import text_with_fact

FACT = "The secret password for the harbour gate is 'blue heron'."
QUESTION = "What is the secret password for the harbour gate?"


def prompt_ids(session: Session, text: str, question: str) -> list[int]:
    """The ids a fresh session feeds for text then question, built from its tokenizer and format."""
    tokenizer, fmt = session.tokenizer, session.chat_format
    pieces = [fmt.open_first_user, text, fmt.question_separator + question + fmt.open_assistant]
    return [token for piece in pieces for token in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop:
            return tokens[:index]
    return tokens


def test_greedy_answer_equals_transformers_generate(smollm):
    model, tokenizer = smollm
    text = text_with_fact(FACT, n_sentences=55, depth=0.3, seed=11)
    session = Session(model, LtriConfig(memory=MemoryConfig(policy="full"), chunk_size=256), tokenizer=tokenizer)
    session.feed(text)
    answer = session.ask(QUESTION, max_new_tokens=24)
    ids = prompt_ids(session, text, QUESTION)
    assert 900 <= len(ids) <= 1300, len(ids)
    assert session.stats().tokens_seen == len(ids) + len(session.last_answer_tokens)

    model.set_attn_implementation("sdpa")
    try:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    finally:
        model.set_attn_implementation("ltri")
    assert session.last_answer_tokens == until_stop(generated, session.stop_token_ids)
    assert "blue heron" in answer


def test_chat_pieces_rebuild_the_models_own_template(smollm):
    _, tokenizer = smollm
    session_format = ChatFormat.for_tokenizer(tokenizer)
    context, q1, a1, q2 = "Some text.", "First question?", "An answer.", "Second question?"
    ours = (
        session_format.open_first_user
        + context
        + session_format.question_separator
        + q1
        + session_format.open_assistant
        + a1
        + session_format.open_next_user
        + q2
        + session_format.open_assistant
    )
    messages = [
        {"role": "user", "content": context + "\n\n" + q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
    ]
    assert ours == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_answers_join_the_context_and_stream_matches_ask(smollm):
    model, tokenizer = smollm
    text = text_with_fact(FACT, n_sentences=20, depth=0.5, seed=2)
    first = Session(model, tokenizer=tokenizer)
    first.feed(text)
    answer = first.ask(QUESTION, max_new_tokens=20)
    first_answer_tokens = first.last_answer_tokens
    before = first.stats().tokens_seen
    follow_up = "Repeat your last answer."
    follow_up_ids = first.question_tokens(follow_up)
    first.ask(follow_up, max_new_tokens=8)
    assert first.stats().tokens_seen == before + len(follow_up_ids) + len(first.last_answer_tokens)

    assert answer == tokenizer.decode(first_answer_tokens, skip_special_tokens=True)

    second = Session(model, tokenizer=tokenizer)
    second.feed(text)
    pieces = list(second.stream(QUESTION, max_new_tokens=20))
    assert len(pieces) > 1 and "".join(pieces) == answer
