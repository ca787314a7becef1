"""Named long-context methods, all run by the same Session: each one is an LtriConfig preset.

``method_config(method, base)`` keeps what the caller chose about resources and the shared budget
(the base's sinks, window, retrieval budget, index backend, span cache size, chunk size, device and
dtype) and sets what defines the method:

- ``full``: every token stays resident (the exactness reference; memory grows with the text).
- ``streaming``: StreamingLLM-like, the first n_sink tokens and the last n_window tokens, nothing else.
- ``ltri``: this project's method (DESIGN.md): spans cut where the chunk's own attention forms
  triangles, 1..max_vectors most attended keys per span, votes pooled over heads with persistence
  and collaboration between layers, compact positions. It is the base config itself with the ltri
  policy, so that variants of it (index vectors, query dims...) are the base's span and retrieval
  fields.
- ``infllm`` (InfLLM, arXiv 2402.04617): fixed blocks of 128 tokens, each indexed by its 4 most
  attended keys (every fixed block gets max_vectors keys: its score is 0 and it is not a triangle),
  every retrieved token at one position (``one_angle``), no persistence, no collaboration.
  What differs from the paper: a block's representative keys are the ones its own queries attend to
  most (in-block column sums of the chunk's attention), where InfLLM scores each key by the queries
  of the following local window; a block scores by its best representative key (max), where InfLLM
  sums over them; the layer's heads pool softmax-weighted votes (``ltri.retrieval``), where InfLLM
  adds up raw scores over heads; a prefill chunk asks with the mean query of each head, which ranks
  blocks as InfLLM's sum over the chunk's queries does; tokens that arrive in pieces shorter than min_len
  (decode steps, a short question) make blocks indexed by their mean key; the block of a chunk's
  end is shorter when 128 does not divide the chunk (after the sinks).
- ``quest`` (Quest, arXiv 2406.10774): pages of 16 tokens, each indexed by Quest's element-wise
  [kmax, kmin] bound, true positions, no persistence, no collaboration.
  What differs from the paper: Quest reads the prompt with full attention and selects pages only at
  decode steps, per head, keeping the first two layers dense; here the prompt is read in streaming
  chunks that attend to sinks, retrieved pages and the window like every sparse method, and the
  heads of a layer vote for one shared set of pages. Pages still travel through the LMDB span store
  and the span cache: accuracy does not depend on where payloads live. ``true`` positions past a
  model's trained length are out of its range, as in the paper (Quest targets long-context models).

The sparse methods (``ltri``, ``infllm``, ``quest``) share the base's token budget. For the fixed
segmentations, each query asks the index for at least budget / block length spans, so that one query
alone can fill the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ltri.config import LtriConfig, MemoryConfig, RetrievalConfig, SpanConfig
from ltri.errors import LtriError

METHODS = ("full", "streaming", "infllm", "quest", "ltri")
INFLLM_BLOCK = 128  # tokens per memory block, as in InfLLM's experiments
INFLLM_REPRESENTATIVES = 4  # representative keys per block, as in InfLLM's experiments
QUEST_PAGE = 16  # tokens per page, as in Quest's experiments
QUEST_MIN_PIECE = 8  # shortest piece cut into pages at once; SpanConfig needs max_len >= 2 * min_len - 1


def method_config(method: str, base: LtriConfig | None = None) -> LtriConfig:
    """The config that runs method, with the base's sinks, window, budget, chunk, device and dtype."""
    base = base or LtriConfig()
    if method not in METHODS:
        raise LtriError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    if method in ("full", "streaming", "ltri"):
        return replace(base, memory=replace(base.memory, policy=method))
    if method == "infllm":
        spans = SpanConfig(
            segmentation="fixed", max_len=INFLLM_BLOCK, index_vectors="keys", max_vectors=INFLLM_REPRESENTATIVES
        )
        return baseline_config(base, spans, position_mode="one_angle")
    spans = SpanConfig(segmentation="fixed", min_len=QUEST_MIN_PIECE, max_len=QUEST_PAGE, index_vectors="bounds")
    return baseline_config(base, spans, position_mode="true")


def baseline_config(base: LtriConfig, spans: SpanConfig, position_mode: str) -> LtriConfig:
    """A published method on the ltri policy: its spans and positions, the base's resources and budget,
    retrieval without persistence, collaboration, max votes or a reread at questions (neither method has them) and
    otherwise the defaults."""
    memory = MemoryConfig(policy="ltri", n_sink=base.memory.n_sink, n_window=base.memory.n_window)
    given = base.retrieval
    search_k = max(RetrievalConfig().search_k, math.ceil(given.budget / spans.max_len))
    retrieval = RetrievalConfig(
        budget=given.budget,
        backend=given.backend,
        cache_mb=given.cache_mb,
        search_k=search_k,
        persistence=0.0,
        collaboration=0.0,
        vote="mean",  # neither method has ltri's answer-time reading: one vote, no reread, no evidence
        reading_vote=None,
        reread=False,
        reread_evidence=0,
        echo_tokens=0,
    )
    return LtriConfig(
        memory=memory,
        spans=spans,
        retrieval=retrieval,
        chunk_size=base.chunk_size,
        position_mode=position_mode,
        device=base.device,
        dtype=base.dtype,
    )
