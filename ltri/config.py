"""Frozen configuration, one dataclass per concern; invariants are checked on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ltri.errors import LtriError

MEMORY_POLICIES = ("ltri", "full", "streaming")
POSITION_MODES = ("compact", "one_angle", "true")
INDEX_VECTORS = ("keys", "bounds")
SEGMENTATIONS = ("triangles", "fixed")
SELECTORS = ("none", "loki", "sparq")
INDEX_BACKENDS = ("auto", "torch", "faiss")
QUERY_DIMS = ("all", "long_range")
VOTES = ("mean", "max")
HOST_PAYLOADS = ("cuda", "always", "never")
GPU_CHUNK, CPU_CHUNK = 2048, 1024  # LtriConfig.prefill_chunk's defaults


@dataclass(frozen=True)
class MemoryConfig:
    """What each layer keeps between chunks.

    policy: ``ltri`` keeps sinks and the local window on the device and moves older tokens, cut into
        spans, to the span store, retrieving the spans each chunk and each decode step needs;
        ``full`` keeps every token (the exactness reference); ``streaming`` keeps the first
        ``n_sink`` tokens and the last ``n_window`` tokens (StreamingLLM-like).
    n_sink: attention-sink tokens kept from the start of the text.
    n_window: most recent tokens kept (the local window). 512 by default: with 512 retrieved tokens the
        bundled 135M model reads about 1.1K resident tokens, and answers the needle benchmark far better
        than with 2048 of each (benchmarks/needle/README.md); larger models may want more.
    host_payloads: where the ``ltri`` policy keeps its stored tokens in pinned host memory, which the GPU
        reads in place, so that a whole decode step runs as one CUDA graph (``ltri.captured_decode``):
        ``cuda`` on CUDA devices, ``always`` (on a CPU too: the same code runs eagerly), ``never``. These rows
        are the tokens' only copy until a save writes them to the span store; when host memory runs short they
        are written there and dropped, and decode steps go back to the span cache.
    row_cache: a captured decode step keeps the rows its layer retrieved last on the device and reads those again
        from there, not over PCIe (``ltri.offload.row_cache``; two copies of a budget's rows a layer, 2 MB each at
        the default budget of a Llama-3-8B layer, and a slot of 4 bytes a stored token); with a token selector, each
        KV head's selected rows (select_tokens rows, and a slot of 4 bytes a stored token and KV head), and what the
        selector's scores read of the last step's candidates (a budget's rows: Loki's projections, SparQ's keys).
        On an H100 it took the 128K decode step of an 8B-shaped model from 13.24 to 12.33 ms (median; 48% of the
        retrieved rows found there, random weights, no selector; ``benchmarks/speed/NOTES.md`` step 43).
    """

    policy: str = "ltri"
    n_sink: int = 64
    n_window: int = 512
    host_payloads: str = "cuda"
    row_cache: bool = True

    def __post_init__(self) -> None:
        if self.policy not in MEMORY_POLICIES:
            raise LtriError(f"Unknown memory policy {self.policy!r}: choose one of {', '.join(MEMORY_POLICIES)}.")
        if self.n_sink < 0:
            raise LtriError(f"n_sink must be 0 or more, got {self.n_sink}.")
        if self.n_window < 1:
            raise LtriError(f"n_window must be at least 1 token, got {self.n_window}.")
        if self.host_payloads not in HOST_PAYLOADS:
            raise LtriError(f"Unknown host_payloads {self.host_payloads!r}: choose one of {', '.join(HOST_PAYLOADS)}.")

    def keeps_host_rows(self, device) -> bool:
        """Whether the ``ltri`` policy keeps its stored tokens in host rows on device (host_payloads); while it
        does they are their only copy, and the span store gets them at a save."""
        return self.host_payloads == "always" or (self.host_payloads == "cuda" and str(device).startswith("cuda"))


@dataclass(frozen=True)
class SpanConfig:
    """How tokens leaving the local window are cut into spans and indexed (the ``ltri`` policy).

    segmentation: ``triangles`` cuts each fresh chunk where its own attention forms local triangles
        (Ltri-LLM); ``fixed`` cuts blocks of exactly max_len tokens (InfLLM's blocks, Quest's pages).
    min_len, max_len: span length bounds in tokens.
    theta: triangle threshold of the segmentation; None picks the default rule of ``ltri.spans``.
    nms_iou: overlap allowed between candidate spans kept by non-maximum suppression (0: none).
    index_vectors: ``keys`` indexes each span by its most attended keys (1..max_vectors, fewer for
        confident spans); ``bounds`` by Quest's element-wise [kmax, kmin] (never under-estimates).
    """

    segmentation: str = "triangles"
    min_len: int = 8
    max_len: int = 128
    theta: float | None = None
    nms_iou: float = 0.0
    index_vectors: str = "keys"
    max_vectors: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_len or self.max_len < 2 * self.min_len - 1:
            # Below 2 * min_len - 1 some gaps between triangles cannot be cut into spans within the bounds.
            raise LtriError(
                f"Span lengths need 1 <= min_len and max_len >= 2 * min_len - 1, got {self.min_len} and {self.max_len}."
            )
        if self.segmentation not in SEGMENTATIONS:
            raise LtriError(f"Unknown segmentation {self.segmentation!r}: choose one of {', '.join(SEGMENTATIONS)}.")
        if not 0 <= self.nms_iou < 1:
            raise LtriError(f"nms_iou must be in [0, 1), got {self.nms_iou}.")
        if self.index_vectors not in INDEX_VECTORS:
            raise LtriError(f"Unknown index vectors {self.index_vectors!r}: choose one of {', '.join(INDEX_VECTORS)}.")
        if self.max_vectors < 1:
            raise LtriError(f"max_vectors must be at least 1, got {self.max_vectors}.")


@dataclass(frozen=True)
class RetrievalConfig:
    """Which stored spans each chunk and decode step brings back (the ``ltri`` policy).

    budget: most retrieved tokens per layer in one step (besides sinks, window and chunk).
    search_k: spans each query asks the index for; the queries' votes are pooled.
    max_voting_queries: a chunk of at most this many tokens asks with every query (a question, a
        decode step); a longer one with the mean query of each head.
    voting_window: when > 0, such a chunk votes with its last voting_window queries only (SnapKV's observation
        window: the end of a question, where the answer starts, knows best what it needs); 0: all of them.
    backend: span index backend, ``torch`` (exact matmul), ``faiss``, or ``auto`` (torch on CUDA,
        faiss on CPU).
    vote: how the queries' softmax weights over the spans they found become one vote per span: ``mean``
        (what most queries lean towards) or ``max`` (what any one query is sure of), where every query votes
        (chunks of at most max_voting_queries tokens: a question, a decode step).
    reading_vote: the same for longer chunks, which vote with each head's mean query (the text being read);
        None: as ``vote``.
    persistence: how much of a span's vote carries over to the next step (effective vote = max(vote,
        persistence * last effective vote)), so evidence is not dropped one token later; 0 disables.
    collaboration: weight of the votes borrowed from other layers (0: each layer alone).
    query_dims: ``all`` scores spans with every query dimension (pre-RoPE q.k); ``long_range`` only with
        the slowly rotating RoPE pairs (under one radian over n_window tokens), which carry the model's
        attention over long distances.
    score_distance: the query-key distance, in tokens, at which retrieval scores q.k: the query is
        RoPE-rotated by it before it asks the index of pre-RoPE keys (0: no rotation, q.k at distance 0).
    cache_mb: device memory for recently used span payloads, all layers together.
    selector: how a decode step narrows the retrieved tokens before attending: ``none`` attends to all
        of them; ``loki`` keeps the select_tokens best per KV head by low-rank scores in the principal
        directions of the document's keys; ``sparq`` by scores on the select_rank largest query components.
    select_tokens: retrieved tokens each KV head keeps at a decode step (loki, sparq).
    select_rank: dimensions the loki and sparq scores use.
    refresh_every: decode steps per retrieval while answering. 1 retrieves at every generated token; N > 1
        retrieves at every N-th one and attends to the spans the last retrieval loaded in between; 0 keeps
        the spans the question (the last prefill chunk) retrieved for the whole answer. Prefill chunks
        always retrieve. Skipping retrieval removes its host work (index search, votes, store reads) from
        those steps.
    reread: at each question, once it is read, read the window again (``ltri.reread``): its tokens' keys and
        values are computed anew attending to the sinks and the spans the question retrieved, as they would be
        in a short text that holds that evidence; then the answer begins. Costs one forward over the window.
    reread_evidence: with reread, also read again this many stored tokens, those most layers' question retrieval
        agreed on, before the window in the same chunk; each layer keeps them resident for the answer
        (``ltri.evidence``). 0: the window only.
    draft_tokens: with reread_evidence, choose the evidence by a greedy draft answer of up to this many tokens
        (``ltri.draft``): the stored tokens the question's and the draft's retrieval held most often, counted over
        layers and steps; the draft is then forgotten and the answer decodes from the reread. 0: the question's
        retrieval alone chooses. Costs that many decode steps per question.
    echo_tokens: of the reread_evidence, up to this many stored tokens around where the question's own words recur
        in the text, its rarest runs of consecutive tokens first (``ltri.echo``: token ids alone, no model step);
        the rest is chosen as above. 0: none. (Without reread, or past reread_evidence, it has no effect.)

    The defaults (votes by max while asking and by mean while reading, reread with 512 tokens of evidence, 256 of
    them the echo's) scored 1.00 in the needle test at 8K, 16K, 32K and 64K on an H200 (code of 29996ea), where the
    earlier defaults (mean votes, no reread) scored 0.80, 0.20, 0.35 and 0.30 (benchmarks/needle/README.md); a
    reread costs one forward over the window and the evidence at each question, and the answer's steps stay
    captured (``ltri.captured_decode``).
    """

    budget: int = 512
    search_k: int = 64
    max_voting_queries: int = 64
    voting_window: int = 0
    backend: str = "auto"
    vote: str = "max"
    reading_vote: str | None = "mean"
    persistence: float = 0.8
    collaboration: float = 1.0
    query_dims: str = "all"
    score_distance: int = 0
    cache_mb: int = 2048
    selector: str = "none"
    select_tokens: int = 1024
    select_rank: int = 16
    refresh_every: int = 1
    reread: bool = True
    reread_evidence: int = 512
    draft_tokens: int = 0
    echo_tokens: int = 256

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise LtriError(f"The retrieval budget must be 0 or more tokens, got {self.budget}.")
        if self.reread_evidence < 0:
            raise LtriError(f"reread_evidence must be 0 or more tokens, got {self.reread_evidence}.")
        if self.draft_tokens < 0:
            raise LtriError(f"draft_tokens must be 0 or more tokens, got {self.draft_tokens}.")
        if self.draft_tokens and not (self.reread and self.reread_evidence):
            raise LtriError(
                "draft_tokens chooses the evidence a question's reread encodes, so it needs reread on "
                "and reread_evidence above 0."
            )
        if self.echo_tokens < 0:
            raise LtriError(f"echo_tokens must be 0 or more tokens, got {self.echo_tokens}.")
        if self.search_k < 1:
            raise LtriError(f"search_k must be at least 1, got {self.search_k}.")
        if self.backend not in INDEX_BACKENDS:
            raise LtriError(f"Unknown index backend {self.backend!r}: choose one of {', '.join(INDEX_BACKENDS)}.")
        if self.voting_window < 0:
            raise LtriError(f"voting_window must be 0 or more queries, got {self.voting_window}.")
        if self.max_voting_queries < 1:
            raise LtriError(f"max_voting_queries must be at least 1, got {self.max_voting_queries}.")
        for name, vote in (("vote", self.vote), ("reading_vote", self.reading_vote or self.vote)):
            if vote not in VOTES:
                raise LtriError(f"Unknown {name} {vote!r}: choose one of {', '.join(VOTES)}.")
        if not 0 <= self.persistence < 1:
            raise LtriError(f"persistence must be in [0, 1), got {self.persistence}.")
        if self.query_dims not in QUERY_DIMS:
            raise LtriError(f"Unknown query_dims {self.query_dims!r}: choose one of {', '.join(QUERY_DIMS)}.")
        if self.score_distance < 0:
            raise LtriError(f"score_distance must be 0 or more tokens, got {self.score_distance}.")
        if self.collaboration < 0:
            raise LtriError(f"collaboration must be 0 or more, got {self.collaboration}.")
        if self.cache_mb < 0:
            raise LtriError(f"cache_mb must be 0 or more, got {self.cache_mb}.")
        if self.selector not in SELECTORS:
            raise LtriError(f"Unknown selector {self.selector!r}: choose one of {', '.join(SELECTORS)}.")
        if self.select_tokens < 1:
            raise LtriError(f"select_tokens must be at least 1, got {self.select_tokens}.")
        if self.select_rank < 1:
            raise LtriError(f"select_rank must be at least 1, got {self.select_rank}.")
        if self.refresh_every < 0:
            raise LtriError(f"refresh_every must be 0 or more decode steps, got {self.refresh_every}.")


def check_selection_narrows(retrieval: RetrievalConfig) -> None:
    """LtriError, in the command lines' words, where a selector keeps as many tokens as the budget retrieves: a
    decode step would then select nothing (``captured_decode`` and the eager step skip it), which a user who asked for
    a selector did not mean."""
    if retrieval.selector != "none" and retrieval.select_tokens >= retrieval.budget:
        raise LtriError(
            f"--selector {retrieval.selector} keeps --select-tokens ({retrieval.select_tokens}) of the --budget "
            f"({retrieval.budget}) tokens retrieved a step: give a larger --budget or fewer --select-tokens."
        )


@dataclass(frozen=True)
class LtriConfig:
    """How a Session reads text.

    chunk_size: tokens per prefill step (bounds the work and memory of one forward); None: 2048 on CUDA, 1024
        elsewhere (``prefill_chunk``).
    position_mode: ``compact`` lays the resident tokens out contiguously (a short-context model never
        sees a position past what it holds); ``one_angle`` puts every retrieved token at one position,
        about n_window before the chunk (InfLLM); ``true`` uses each token's position in the text.
    device: ``cpu``, ``cuda``, ``cuda:1``...; None picks CUDA when available.
    dtype: ``float32``, ``bfloat16`` or ``float16``; None means float32 on CPU and bfloat16 on CUDA.
    cuda_graphs: on CUDA, a one-token forward (a decode step) replays the dense work between two layers'
        attentions (norms, projections, MLP) as one captured CUDA graph instead of launching it from
        Python (``ltri.decode_step``); the attention with memory runs eagerly between the graphs.
    dense_kernels: on CUDA, a decode step's RMS norms (each with the residual add before it) and its MLP's
        silu(gate) * up run as ltri's Triton kernels (``kernels/rms_norm.py``, ``kernels/silu_mul.py``: one launch
        each) instead of the modules' torch ops (about twenty launches a layer), for the Llama family's modules; and
        its q, k, v projections and its MLP's gate and up projections are one matmul each, from weights joined once
        (``ltri.fused_projections``: the modules' parameters then point into them, so nothing is held twice).
    """

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    spans: SpanConfig = field(default_factory=SpanConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    chunk_size: int | None = None
    position_mode: str = "compact"
    device: str | None = None
    dtype: str | None = None
    cuda_graphs: bool = True
    dense_kernels: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise LtriError(f"chunk_size must be at least 1 token, got {self.chunk_size}.")
        if self.position_mode not in POSITION_MODES:
            raise LtriError(f"Unknown position mode {self.position_mode!r}: choose one of {', '.join(POSITION_MODES)}.")
        if self.retrieval.selector != "none" and self.position_mode == "true":
            raise LtriError(
                "Token selection (selector loki or sparq) needs compact or one_angle positions: each KV head keeps "
                "other tokens, which true positions would rotate differently."
            )
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise LtriError(f"Unknown dtype {self.dtype!r}: choose float32, bfloat16 or float16.")

    def prefill_chunk(self, device) -> int:
        """Tokens per prefill step on device: chunk_size, or by default GPU_CHUNK on CUDA and CPU_CHUNK elsewhere.

        On an H100, 2048-token chunks prefill an 8B model 1.7x faster than 512 for 8 GB more GPU memory
        (benchmarks/speed/NOTES.md step 9); on a CPU the chunk's self-attention, which segmentation reads, grows with
        the square of its length: a 16K needle cell read in 50-65 s with 512, 60-105 s with 1024 and 120-155 s with
        2048, and with the echo evidence reread at the question, 512-token chunks misread four hard 16K cells that
        1024 and 2048 answered (benchmarks/needle/README.md, "The defaults since 2026-12-05")."""
        if self.chunk_size is not None:
            return self.chunk_size
        return GPU_CHUNK if str(device).startswith("cuda") else CPU_CHUNK


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are decoded. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LtriError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LtriError(f"temperature must be 0 or more, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LtriError(f"top_p must be in (0, 1], got {self.top_p}.")
