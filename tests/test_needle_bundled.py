"""The bundled SmolLM2 (trained to 8K tokens) finds a needle in 12K tokens with the default config,
where the streaming policy with the same sinks and window cannot.

The text is the needle benchmark's cell (generated filler, 12K tokens, depth 50%): in
benchmarks/needle/results/cpu-filler-12k-window512/ the default window and budget (512) answer all five
depths, and in cpu-filler-12k-window2048/ the former defaults miss this one."""

import pytest

from ltri import LtriConfig, MemoryConfig, Session
from ltri.needle.haystack import build_context, make_haystack
from ltri.needle.tasks import NEEDLE, QUESTION

LENGTH, DEPTH = 12 * 1024, 50.0


def found(reply: str) -> bool:
    """The needle benchmark's string match: both "sandwich" and "Dolores"."""
    return "sandwich" in reply.lower() and "dolores" in reply.lower()


@pytest.fixture(scope="module")
def haystack(smollm) -> str:
    tokenizer = smollm[1]
    context = build_context(tokenizer, make_haystack(tokenizer, None, LENGTH + 256), LENGTH, DEPTH, NEEDLE)
    assert abs(context.n_tokens - LENGTH) <= 2, context.n_tokens
    return context.text


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
