"""Streaming one answer to the terminal, and what it cost: tokens, seconds, time to the first token."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ltri.cli.options import AnswerOptions


@dataclass(frozen=True)
class AnswerReport:
    text: str
    tokens: int  # tokens decoded
    seconds: float  # from the question to the last token
    first_token_seconds: float | None  # from the question to the first piece of text (None: no text)
    stopped: bool  # cut short by the user

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first piece (the question's prefill is not in it)."""
        if self.first_token_seconds is not None and self.tokens > 1 and self.seconds > self.first_token_seconds:
            return (self.tokens - 1) / (self.seconds - self.first_token_seconds)
        return self.tokens / max(self.seconds, 1e-9)


def stream_answer(
    session, question: str, answer: AnswerOptions, stop: Callable[[], bool] = lambda: False, echo: bool = True
) -> AnswerReport:
    """Answer question, writing the pieces to stdout as they decode when echo; stop() is asked after each."""
    started = time.perf_counter()
    pieces: list[str] = []
    first = None
    stopped = False
    stream = session.stream(question, **answer.sampling())
    try:
        for piece in stream:
            first = first if first is not None else time.perf_counter() - started
            pieces.append(piece)
            if echo:
                sys.stdout.write(piece)
                sys.stdout.flush()
            if stop():
                stopped = True
                break
    finally:
        stream.close()
    seconds = time.perf_counter() - started
    if echo:
        sys.stdout.write(" [stopped]\n" if stopped else "\n")
        sys.stdout.flush()
    return AnswerReport("".join(pieces), len(session.last_answer_tokens), seconds, first, stopped)


class CtrlC:
    """While an answer streams, Ctrl-C stops it after the current token (never inside a forward,
    which would leave the layers' memories out of step), and the program goes on."""

    def __init__(self) -> None:
        self.pressed = False

    def __enter__(self) -> CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.pressed = True
