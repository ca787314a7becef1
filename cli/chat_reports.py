"""What /stats and /spans print: the session's sizes, the last answer's speed and evidence."""

from __future__ import annotations

import resource
import sys

from ltri.cli.answer_stream import AnswerReport
from ltri.cli.options import AnswerOptions
from ltri.cli.units import first_words, human_bytes


def stats_lines(session, last: AnswerReport | None) -> list[str]:
    stats = session.stats()
    lines = [
        f"tokens       {stats.tokens_seen:,} read (the text, questions and answers)",
        f"spans        {stats.spans:,} stored over {stats.layers} layers, {human_bytes(stats.store_bytes)} of payloads",
        f"memory       {human_bytes(stats.memory_bytes)} of keys and values on {session.device}, "
        f"{stats.resident_tokens:,} tokens resident; {_process_memory(session)}",
    ]
    if session.store_path is not None:
        lines.append(f"store        {session.store_path}")
    lines.append(f"last answer  {_answer_line(last)}")
    return lines


def spans_lines(spans) -> list[str]:
    if not spans:
        return ["The last answer drew on no stored spans (none retrieved, or nothing asked since the text was read)."]
    lines = [
        f"{len(spans)} stored spans the last answer drew on, most retrieved first "
        "(coverage: layer-steps that retrieved each token, on average):"
    ]
    for span in spans:
        where = f"tokens {span.start:,}-{span.start + span.length - 1:,}"
        lines.append(f"  {where:<22} {span.coverage:>7.1f}  {first_words(span.text)!r}")
    return lines


def settings_line(answer: AnswerOptions) -> str:
    seed = "none" if answer.seed is None else answer.seed
    return f"temperature {answer.temperature:g}, top_p {answer.top_p:g}, max_tokens {answer.max_tokens}, seed {seed}"


def _answer_line(last: AnswerReport | None) -> str:
    if last is None:
        return "none yet"
    first = "no text" if last.first_token_seconds is None else f"first token after {last.first_token_seconds:.2f} s"
    stopped = " (stopped)" if last.stopped else ""
    plural = "" if last.tokens == 1 else "s"
    speed = f"{last.tokens_per_second:.1f} tokens/s"
    return f"{last.tokens} token{plural} in {last.seconds:.1f} s, {speed}, {first}{stopped}"


def _process_memory(session) -> str:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    line = f"process peak {human_bytes(peak)}"
    if session.device.type == "cuda":
        import torch

        line += f", GPU peak {human_bytes(torch.cuda.max_memory_allocated(session.device))}"
    return line
