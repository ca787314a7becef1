"""A draft answer that chooses the evidence a question's reread encodes (``RetrievalConfig.draft_tokens``).

A question's own queries rarely find a needle in a long text; an answer's first tokens do, since they restate what
was asked ("The best thing to do in San Francisco is") and the model then looks for what followed those words in
the text (benchmarks/needle/README.md). So before answering, ltri decodes a short greedy draft, retrieving at every
token as an answer does, and counts for every text position the (layer, step) pairs that retrieved a span holding
it, the question's steps included (``ltri.retrieval_log``). Then the draft is forgotten: its tokens leave every
layer's window, the count of tokens seen and the token ids, as if never read. The stored tokens counted most are
the evidence the reread encodes next to the question (``ltri.reread``, ``ltri.evidence``).

A draft's tokens can be forgotten while they are the window's unsegmented tail: no layer has cut them into spans.
So a draft stops before any layer would cut (at most ``SpanConfig.max_len`` - 1 tokens after the question's own
unsegmented ones). What the question's retrieval left (the spans it loaded, which the reread attends to, the votes
that persist into the answer's first step, and the votes the layers shared) is brought back too; only spans that
left the window during the draft stay stored, their tokens unchanged. The draft's steps run eagerly (no captured
decode).
"""

from __future__ import annotations

import numpy as np
import torch

from ltri.reread import reread_start


@torch.inference_mode()
def draft_coverage(session, logits: torch.Tensor, n_tokens: int) -> np.ndarray | None:
    """Decode up to n_tokens greedy draft tokens from logits (vocab,), then forget them; the (layer, step) count of
    every text position before the draft, over the question's and the draft's retrieval (n_positions,), or None
    where a reread cannot use it (``reread_start``)."""
    memories = session.cache.memories()
    if reread_start(memories) is None:
        return None
    n_tokens = min(n_tokens, forgettable_tokens(memories))
    n_positions = session.cache.tokens_seen
    retrieval_states = [memory.retrieval_state() for memory in memories]
    shared = memories[0].shared  # one for all layers, or None
    shared_votes = None if shared is None else shared.snapshot()
    drafted = 0
    with session.eager_steps():
        for _ in range(n_tokens):
            token = int(torch.argmax(logits))
            if token in session.stop_token_ids:
                break
            logits = session.forward_token(token)
            drafted += 1
    coverage = session.retrieval_coverage(n_positions)
    session.forget_last(drafted)
    for memory, state in zip(memories, retrieval_states, strict=True):
        memory.restore_retrieval_state(state)
    if shared is not None:
        shared.restore(shared_votes)
    return coverage


def forgettable_tokens(memories: list) -> int:
    """How many tokens every layer can take and then forget (``SpanMemory.forgettable_tokens``)."""
    return min(memory.forgettable_tokens() for memory in memories)
