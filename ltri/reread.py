"""Reading the window again at a question (``RetrievalConfig.reread``).

While ltri streams a long text, each token's keys and values are computed with what was resident then: the
sinks, the spans that chunk retrieved, the window. A question then retrieves its evidence, but the window's tokens
(the text just before the question, and the question itself) were encoded without that evidence in reach, so
their deeper layers carry nothing of it; full attention over the same resident tokens, read as one short text,
answers needle questions that ltri misses for this reason (benchmarks/needle/README.md, "Full attention over
what ltri holds"). Rereading computes the window's keys and values again, attending to the sinks and to the spans
the question retrieved (fixed for the pass, no new retrieval), and then decodes from the reread question.

The chunk read again is every layer's window: from the earliest window start of any layer to the last token
(the windows differ by a span's length between layers, and the question itself may have pushed spans out); a layer
attends to the retrieved spans before the chunk, keeps the new keys and values of its own window and ignores the
earlier tokens, which it holds as stored spans. Token counts, positions, spans and the index do not
change; the pending spans' index vectors keep the keys they were cut from.

With ``reread_evidence`` > 0 the chunk starts with that many stored tokens, those the layers' question retrieval
agreed on most (``ltri.evidence``), so that the evidence too is encoded next to the question rather than where the
long text had it; each layer keeps them resident for the answer, and they are forgotten at the next question or
text fed.
"""

from __future__ import annotations

import torch

from ltri.echo import echo_positions
from ltri.evidence import agreed_counts, most_held_positions
from ltri.span_memory import SpanMemory


def reread_start(memories: list) -> int | None:
    """Where the chunk read again starts: the earliest text position that some layer holds neither as a sink nor
    in a span its question's retrieval could choose (its window, and spans that left the window since). None when
    rereading cannot help: a policy other than ``ltri``, or a layer that has not retrieved (nothing stored yet)."""
    if not memories or not all(isinstance(memory, SpanMemory) for memory in memories):
        return None
    starts = [memory.unseen_by_retrieval() for memory in memories]
    return None if any(start is None for start in starts) else min(starts)


def reread_window(
    session, logits: torch.Tensor, n_evidence: int = 0, coverage=None, question_ids=(), n_echo: int = 0
) -> torch.Tensor:
    """Read every layer's window again with the question's spans, after n_evidence stored tokens: up to n_echo around
    where the question's tokens question_ids (q,) recur (``ltri.echo``), then those the layers' question retrieval
    agreed on (``ltri.evidence``), or with coverage (n_positions,) counts per text position (a draft's,
    ``ltri.draft``) the most counted; the reread last position's logits (vocab,), or logits unchanged where
    rereading cannot help."""
    memories = session.cache.memories()
    start = reread_start(memories)
    if start is None or len(session.token_ids) < session.cache.tokens_seen:  # a store saved without its token ids
        return logits
    evidence = evidence_positions(session, memories, start, n_evidence, coverage, question_ids, n_echo)
    ids = [session.token_ids[position] for position in evidence.tolist()] + list(session.token_ids[start:])
    chunk = torch.tensor(ids, dtype=torch.long, device=session.device)
    positions = torch.cat([evidence, torch.arange(start, session.cache.tokens_seen)]).to(session.device)
    for memory in memories:
        memory.rereading_from, memory.rereading_evidence = start, evidence.to(session.device)
    try:
        return session.run_model(chunk, positions)[-1]
    finally:
        for memory in memories:
            memory.rereading_from = memory.rereading_evidence = None


def evidence_positions(session, memories, start: int, n_evidence: int, coverage, question_ids, n_echo: int):
    """The stored positions (n,) before start that a reread encodes as evidence, ascending (CPU): the echo's first,
    then the retrieval's (the draft's coverage, or the layers' agreement) up to n_evidence in all."""
    echo = echo_positions(session.token_ids[:start], question_ids, min(n_echo, n_evidence))
    counts = agreed_counts(memories, start) if coverage is None else torch.as_tensor(coverage[:start]).clone()
    counts[echo] = 0
    retrieved = most_held_positions(counts, n_evidence - echo.numel())
    return torch.cat([echo, retrieved]).sort().values


def forget_evidence(memories: list) -> None:
    """Drop the evidence the last question's reread kept (before a new question or more text is read)."""
    for memory in memories:
        if isinstance(memory, SpanMemory):
            memory.evidence.clear()
