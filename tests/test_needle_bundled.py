"""The bundled SmolLM2 (trained to 8K tokens) finds a needle in about 12K tokens with the default config,
where the streaming policy with the same sinks and window cannot."""

import pytest

from ltri import LtriConfig, MemoryConfig, Session
from ltri.filler import text_with_fact

FACT = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"


def found(reply: str) -> bool:
    """The needle benchmark's string match: both "sandwich" and "Dolores"."""
    return "sandwich" in reply.lower() and "dolores" in reply.lower()


@pytest.fixture(scope="module")
def haystack(smollm) -> str:
    text = text_with_fact(FACT, n_sentences=730, depth=0.35, seed=21)
    n_tokens = len(smollm[1](text)["input_ids"])
    assert 11_000 <= n_tokens <= 14_000, n_tokens
    return text


def answer(smollm, haystack: str, config: LtriConfig) -> tuple[str, Session]:
    model, tokenizer = smollm
    session = Session(model, config, tokenizer=tokenizer)
    session.feed(haystack)
    return session.ask(QUESTION, max_new_tokens=32), session


def test_default_config_finds_the_needle_beyond_the_trained_length(smollm, haystack):
    reply, session = answer(smollm, haystack, LtriConfig())
    stats = session.stats()
    session.close()
    assert stats.tokens_seen > 11_000 and stats.spans > 0
    assert found(reply), reply


def test_streaming_with_the_same_window_does_not(smollm, haystack):
    default = LtriConfig().memory
    streaming = MemoryConfig(policy="streaming", n_sink=default.n_sink, n_window=default.n_window)
    reply, _ = answer(smollm, haystack, LtriConfig(memory=streaming))
    assert not found(reply), reply
