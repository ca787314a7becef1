"""A whole decode step as one CUDA graph: ltri's attention with memory in fixed shapes, no host decision.

The eager decode step (``ltri.attention.attend_with_memory``) asks the host, in every layer, which spans
won, which of them the span cache holds, how long the resident set is: a few milliseconds of Python and
device syncs per layer (benchmarks/speed/NOTES.md). Here a layer's step reads only device tensors whose
shapes do not change from one step to the next:

    window      the token is written at the window's length (a device count) in the window's buffer (by
                ``kernels.pack_rotate``, which packs the step's keys)
    retrieval   the index scores its whole buffer (vectors past the count left out), votes pool over every
                span slot, shared votes and persistence are updated in place (``kernels.settled_votes``), the
                budget is filled on the device and the chosen spans' rows in the pinned host rows
                (``offload.host_payloads``) are listed (``kernels.budget_rows``, one launch after the best votes'
                top-k), less those the evidence holds
    selection   with a selector (loki, sparq), each KV head keeps the select_tokens best of those rows by its
                approximate scores, in document order (``ltri.token_selection``): SparQ's of their keys, gathered
                over PCIe; Loki's of their keys' projections, kept in host rows beside them and read in place (with
                MemoryConfig.row_cache, the last step's candidates' keys or projections from device copies)
    attention   sinks, those rows (read straight over PCIe, or from the device copies of the rows the last step
                retrieved, ``offload.row_cache``, with MemoryConfig.row_cache: each KV head's selected rows with a
                selector), the evidence a question's reread left resident for its answer (``ltri.evidence``, fixed
                while the answer decodes) and window packed at compact positions into one padded key set, keys and
                query rotated (``kernels.pack_rotate``, one kernel on CUDA), and attended with the sparse attention
                kernel up to the valid count

so the dense segments and every layer's attention are captured together and replayed with one launch.
The host writes three counts per layer before a step (window length, index vectors, text position) and
books the step after it (the window's new token, cuts and evictions, which run eagerly as ever).

A graph stays valid while the tensors it reads are the same; when a buffer grows (the window, the index,
the span tables, the votes) the next step runs the same code eagerly, and the one after is captured
anew. On a CPU, or with graphs off, every step runs the same code eagerly.

Shapes: query (1, nheads, 1, headdim), key, value (1, nheads_kv, 1, headdim) pre-RoPE; budget B retrieved
tokens (select_tokens when a selector narrows them); E evidence tokens; the packed key set P = n_sink + B + E +
window capacity.
"""

from __future__ import annotations

from collections import Counter

import torch

from ltri.decode_step import DecodeStep
from ltri.evidence import rows_not_held
from ltri.kernels.budget_rows import budget_rows
from ltri.kernels.cached_gather import cached_gather
from ltri.kernels.lowrank_scores import reads_whole_rows
from ltri.kernels.pack_rotate import StepSources, pack_rotate
from ltri.kernels.sparse_attention import sparse_attention
from ltri.offload.row_cache import RowCache
from ltri.positions import Rotary
from ltri.span_memory import SpanMemory
from ltri.token_selection import TokenSelector
from ltri.topk import first_k_places

WINDOW_HEADROOM = 256  # tokens of window capacity kept free, so that growth (and a new capture) is rare
# Decode steps' tokens a binding reserves room for in the stored spans' tables and index, past the window's own:
# a room that happens to be just enough when the step binds would otherwise run out a few steps later in one of
# 32 layers, and cost a second binding (NOTES.md step 10).
BIND_SLACK = 1024


# What a step's signature holds per layer, in order (CapturedDecode._signature), to say what made a rebind.
BUFFER_NAMES = (
    "window keys", "window values", "window positions", "index vectors", "index slot firsts", "index slot counts",
    "span lengths", "span first rows", "row owners", "persistence", "shared votes previous", "shared votes current",
)  # fmt: skip
SHAPE_NAMES = ("vectors per span", "budget candidates", "evidence")


def candidates(memory: SpanMemory) -> int:
    """The best votes a captured step fills the budget from: at least the most stored spans the budget can hold,
    rounded up to a power of two, so that a shorter span stored while decoding seldom changes it (and the step)."""
    fitting = memory.tables.spans_fitting(memory.retrieval_config.budget)
    return 1 << max(fitting - 1, 0).bit_length()


class CapturedLayer:
    """One layer's attention with memory in fixed shapes, bound to the memory's tensors as they are now.

    counts: (3,) int64 on the device, written by the host before each step: the window's length before the
    step, the index's vectors, the token's text position."""

    def __init__(self, memory: SpanMemory, rotary: Rotary, counts: torch.Tensor, turns_shared_votes: bool) -> None:
        self.memory = memory
        self.counts = counts
        self.turns_shared_votes = turns_shared_votes  # the first layer of a step starts the shared votes' step
        self.budget = memory.retrieval_config.budget
        self.n_sink = memory.sinks.length
        self.n_slots = memory.tables.span_capacity + 1  # the last slot is the empty span
        self.n_chosen = min(self.n_slots, self.budget, candidates(memory))
        self.chosen = torch.empty(self.n_chosen, dtype=torch.long, pin_memory=counts.is_cuda)  # host copy, per step
        evidence = memory.evidence
        self.held_rows = evidence.held_rows(self.n_sink, memory.tables.owner.numel()) if evidence.length else None
        self.selector = _selector(memory)
        self.projections = None if self.selector is None else memory.stored_projections()  # loki's, caught up
        n_attended = self.budget if self.selector is None else self.selector.n_tokens
        # the last step's retrieved rows kept on the device (with a selector, each KV head's own selected rows), and
        # with a selector what its scores read of the last step's candidates (the retrieved rows)
        payloads = memory.host_payloads
        self.row_cache = self.candidate_cache = None
        if memory.memory_config.row_cache:
            n_rows, heads = memory.tables.owner.numel(), None if self.selector is None else payloads.row_shape[1]
            self.row_cache = RowCache(n_attended, n_rows, payloads.row_shape, payloads.dtype, counts.device, heads)
            self.candidate_cache = self._candidate_cache(n_rows, counts.device)
        self.n_packed = self.n_sink + n_attended + evidence.length + memory.window.capacity
        self.table = rotary.prefix_table(self.n_packed, like=memory.window.buffers()[0])

    def _candidate_cache(self, n_rows: int, device: torch.device) -> RowCache | None:
        """A cache of what the selector's scores read of the last step's candidates: Loki's projections (where its
        kernel reads them a whole row at a time), SparQ's keys; None without a selector."""
        if self.selector is None:
            return None
        if self.projections is None:
            payloads = self.memory.host_payloads
            return RowCache(self.budget, n_rows, payloads.row_shape[1:], payloads.dtype, device)  # (nheads_kv, hd)
        if not reads_whole_rows(self.projections.scored()):  # its width not a power of 2
            return None
        rows = self.projections.rows
        return RowCache(self.budget, n_rows, rows.row_shape, rows.dtype, device)  # (nheads_kv, rank)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """The layer's attention output (1, nheads, 1, headdim); the token's key and value join the window."""
        rows, n_retrieved = self.retrieve(query)
        if self.selector is not None:
            rows, n_retrieved = self.select(query, rows, n_retrieved)
        step = pack_rotate(self.sources(query[0, :, 0], key[0, :, 0], value[0, :, 0], rows, n_retrieved))
        if self.row_cache is not None:
            self.row_cache.refresh(rows, n_retrieved)
        output, _ = sparse_attention(step.query, step.keys, step.values, n_valid=step.n_valid, scale=scaling)
        return output[None]

    def sources(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor, n_retrieved
    ) -> StepSources:
        """What the step attends to: sinks, the retrieved (or each KV head's selected) tokens' rows in the host rows,
        the evidence (empty but after a question's reread), the window with the step's own token; query (nheads,
        headdim), key and value (nheads_kv, headdim) pre-RoPE. pack_rotate writes the token into the window (at the
        window's length, its position too) and packs them all at compact positions (one kernel on CUDA)."""
        window_keys, window_values, window_positions = self.memory.window.buffers()
        sink_keys, sink_values = _keys_values(self.memory.sinks, window_keys)
        evidence_keys, evidence_values = _keys_values(self.memory.evidence.tokens, window_keys)
        cache = self.row_cache
        cached = {} if cache is None else {"cache_slots": cache.slots, "cache_rows": cache.rows,
                                           "cache_out": cache.incoming}  # fmt: skip
        return StepSources(
            query, self.counts[0:1], sink_keys, sink_values, self.memory.host_payloads.device_view(), rows,
            n_retrieved, evidence_keys, evidence_values, window_keys[0], window_values[0], self.table.cos[0, 0],
            self.table.sin[0, 0], **cached, step_key=key, step_value=value, step_position=self.counts[2:3],
            window_positions=window_positions,
        )  # fmt: skip

    def retrieve(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The budget's tokens for query: their rows in the host rows (B,) int64 (0 past the count), their count; those
        the evidence holds left out, as the eager step leaves them out (``Evidence.leave_out``)."""
        memory = self.memory
        search = memory.search_queries(query)
        scores, slots = memory.index.search_captured(
            search, memory.retrieval_config.search_k, self.counts[1], self.n_slots
        )
        if memory.shares_votes and self.turns_shared_votes:
            memory.shared.turn()  # what begin_step does at a step's first layer, unconditionally
        tables = memory.tables
        votes = memory.votes(scores, slots, self.n_slots, tables.owner.numel())  # the whole tables, padding too
        chosen, rows, count = budget_rows(
            votes, first_k_places(votes, self.n_chosen), tables.lengths, tables.first_rows, self.budget,
            memory.span_config.max_len,
        )  # fmt: skip
        self.chosen.copy_(chosen, non_blocking=True)
        return (rows, count) if self.held_rows is None else rows_not_held(rows, count, self.held_rows)

    def select(self, query: torch.Tensor, rows: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each KV head's selector.n_tokens best of the retrieved rows (B,) (their first count valid), as the eager
        step chooses them (``TokenSelector.select``): rows (nheads_kv, n_tokens) in document order, the valid first,
        and their count, min(count, n_tokens); fixed shapes, no host sync. Loki reads the rows' stored projections
        in place (``offload.projected_keys``); SparQ, whose components depend on the query, their keys gathered. With
        MemoryConfig.row_cache, what the last step's candidates had is read from the candidate cache."""
        cache = self.candidate_cache
        cached = None if cache is None else cache.read_and_refilled()
        if self.projections is not None:  # (nheads_kv, max_tokens, rank), read at rows (held ones from the cache)
            scored, candidates, scores_cache = self.projections.scored(), rows, cached
        else:
            keys = self.memory.host_payloads.device_view()[:, 0]  # (n_rows, nheads_kv, headdim)
            gathered = keys[rows] if cached is None else cached_gather(keys, rows, cached)  # (B, nheads_kv, headdim)
            scored, candidates, scores_cache = gathered.transpose(0, 1), None, None
        n_valid = count.reshape(1).repeat(scored.shape[0])  # (nheads_kv,): the kernels read one count a head
        best = self.selector.best(query, scored, n_valid, candidates, scores_cache)
        if cache is not None:
            cache.refresh(rows, count)
        return rows[best], count.clamp(max=self.selector.n_tokens)


def _selector(memory: SpanMemory) -> TokenSelector | None:
    """The layer's token selector, None when it has none or the budget never retrieves more than it keeps."""
    config = memory.retrieval_config
    if config.selector == "none" or config.budget <= config.select_tokens:
        return None
    return memory.token_selector()


def _keys_values(buffer, window_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token buffer's keys and values (nheads_kv, n, headdim) for pack_rotate; empty ones shaped like the window's
    when it holds nothing (a buffer that never held a token has no shape)."""
    if buffer.length == 0:
        empty = window_keys[0, :, :0]
        return empty, empty
    return buffer.keys()[0], buffer.values()[0]


CACHE_KINDS = ("row_cache", "candidate_cache")  # a CapturedLayer's row caches (``offload.row_cache``)


class CapturedDecode:
    """Decode steps of a Session through CapturedLayers, as one CUDA graph when use_graph (CUDA only)."""

    def __init__(self, step: DecodeStep, memories: list[SpanMemory], rotary: Rotary, device, use_graph: bool) -> None:
        self.step = step
        self.memories = memories
        self.rotary = rotary
        self.device = torch.device(device)
        self.use_graph = use_graph and self.device.type == "cuda"
        pinned = self.device.type == "cuda"
        self.counts_host = torch.zeros(len(memories), 3, dtype=torch.long, pin_memory=pinned)
        self.counts = torch.zeros(len(memories), 3, dtype=torch.long, device=self.device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.layers: list[CapturedLayer] | None = None
        self.signature: tuple | None = None
        self._held: list | None = None  # the tensors the signature names, kept alive while it is (_signature)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self._counts_read: torch.cuda.Event | None = None
        self.steps = {"bound": 0, "replayed": 0, "eager": 0, "declined": 0}  # how each call went
        self.rebinds: Counter[str] = Counter()  # what changed, each time a bound step had to be bound anew
        self._bound_signature: tuple | None = None
        self._dropped_hits = {kind: torch.zeros(2, dtype=torch.long, device=self.device) for kind in CACHE_KINDS}
        self._cache_kinds_bound: set[str] = set()  # the kinds of row cache some binding's layers had

    def __call__(self, token: torch.Tensor) -> torch.Tensor | None:
        """Logits (1, vocab) float32 of a decode step for token (1,); None (nothing done) when a layer cannot
        take a captured step, and the caller runs the eager one."""
        if not all(memory.captured_ready() for memory in self.memories):
            self.drop()
            self.steps["declined"] += 1
            return None
        self._make_room()
        signature, held = self._signature()
        if signature != self.signature:  # binding anyway: room for the steps to come costs no extra binding now
            self._make_room(slack=BIND_SLACK)
            signature, held = self._signature()
        self._write_counts()
        self.token.copy_(token.view(1, 1))
        if signature != self.signature:
            self._note_rebind(signature)
            self.drop()
            if not all(memory.index.captured_search_ready() for memory in self.memories):
                self.steps["declined"] += 1
                return None
            self.layers = self._bind()
            self.signature, self._held = signature, held
            logits = self._forward()  # eager, and the warm-up of the next step's capture
            self.steps["bound"] += 1
        elif self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.graph_logits.clone()
            self.steps["replayed"] += 1
        else:
            logits = self._forward()
            self.steps["eager"] += 1
        self._book()
        return logits

    def drop(self) -> None:
        """Forget the graph and the bound layers (the next captured step binds and runs eagerly first); their row
        caches' hits are kept (``cache_hits``)."""
        if self.layers is not None:
            for kind, dropped in self._dropped_hits.items():
                dropped += self._bound_hits(kind)
        self.graph = self.graph_logits = self.layers = self.signature = self._held = None

    def cache_hits(self, kind: str = "row_cache") -> list[int] | None:
        """[rows found in the layers' row caches of this kind, rows read], all layers and every captured step since
        this object was made (each bind makes new caches, empty; ``offload.row_cache``). kind ``row_cache``: the
        attended rows (with a token selector each KV head's, a row counted once a head); ``candidate_cache``: what
        a selector's scores read of its candidates (Loki's projections, SparQ's keys). None where no step so far
        had such a cache. Reading waits for the device."""
        if kind not in self._cache_kinds_bound:
            return None
        return (self._dropped_hits[kind] + self._bound_hits(kind)).tolist()

    def _bound_hits(self, kind: str) -> torch.Tensor:
        caches = [getattr(layer, kind) for layer in self.layers or () if getattr(layer, kind) is not None]
        if not caches:
            return torch.zeros_like(self._dropped_hits[kind])
        return torch.stack([cache.hits for cache in caches]).sum(0)

    def _forward(self) -> torch.Tensor:
        layers = self.layers
        return self.step.walk(self.token, lambda index, q, k, v, scaling: layers[index].attend(q, k, v, scaling))

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.graph_logits = self._forward()
        self.graph = graph

    def _bind(self) -> list[CapturedLayer]:
        layers = [
            CapturedLayer(memory, self.rotary, self.counts[index], turns_shared_votes=index == 0)
            for index, memory in enumerate(self.memories)
        ]
        for kind in CACHE_KINDS:
            if any(getattr(layer, kind) is not None for layer in layers):
                self._cache_kinds_bound.add(kind)
        return layers

    def _make_room(self, slack: int = 0) -> None:
        """Room in every buffer a step writes in place, so that nothing grows while a graph records; and in the
        stored spans' tables and index for the window's tokens and slack tokens more (``_reserve_stored``), so
        that the evictions of the next steps rarely grow them (each growth costs an eager step and a capture)."""
        for memory in self.memories:
            room = memory.window.capacity - memory.window.length
            if room < 1 or room > 2 * WINDOW_HEADROOM:  # a window grown by prefill chunks is packed every step
                memory.window.resize(memory.window.length + WINDOW_HEADROOM)
            self._reserve_stored(memory, slack)
            memory.persistence.reserve(memory.tables.span_capacity + 1, self.device)
            if memory.shared is not None:
                memory.shared.reserve(memory.sinks.length + memory.tables.owner.numel(), self.device)

    @staticmethod
    def _reserve_stored(memory: SpanMemory, slack: int) -> None:
        """Room in the span tables and the index for as many tokens as the window can hold before _make_room packs
        it (each may leave, as one span at most), and slack tokens more; when that is short, for WINDOW_HEADROOM
        tokens more. (Not the window's capacity itself, which a reopened session does not share with the saved one.)"""
        leaving = memory.window.length + 2 * WINDOW_HEADROOM + slack
        more = leaving + WINDOW_HEADROOM
        tables, index, max_vectors = memory.tables, memory.index, memory.span_config.max_vectors
        if min(tables.room()) < leaving:
            tables.reserve(tables.n_spans + more, tables.n_rows + more)
        span_room, vector_room = index.room()
        if span_room < leaving or vector_room < leaving * max_vectors:
            index.reserve(index.n_spans + more, index.n_vectors + more * max_vectors)

    def _note_rebind(self, signature: tuple) -> None:
        """Count the parts of the signature that changed since the last binding (each part once per rebind)."""
        before, self._bound_signature = self._bound_signature, signature
        if before is None or self.signature is None:
            return  # the first binding, or one after the step was dropped
        changed = set()
        for old, new in zip(before, signature, strict=True):  # per layer: the buffers, then the two shapes
            names = BUFFER_NAMES[: len(old) - len(SHAPE_NAMES)] + SHAPE_NAMES
            changed.update(name for name, a, b in zip(names, old, new, strict=True) if a != b)
        self.rebinds.update(changed)

    def _signature(self) -> tuple[tuple, list]:
        """The tensors a bound step reads and writes, as their ids, and the shapes it was bound for: the same tuple
        means the graph is still valid. Returns it and the tensors, which the caller keeps alive for as long as it
        keeps the signature, so that no id it names can be another tensor's (buffers grow into new tensors and never
        change storage in place). Ids, not data pointers: at 32 layers and 13 tensors each, reading pointers and
        sizes took about 1 ms of a 128K decode step's host time on the H100, while the GPU waited (NOTES.md step
        40)."""
        signature, held = [], []
        for memory in self.memories:
            tables = memory.tables
            tensors = (
                *memory.window.buffers(), *memory.index.buffers(), tables.lengths, tables.first_rows, tables.owner,
                memory.persistence.buffer,
            )  # fmt: skip
            if memory.shared is not None:
                tensors += (memory.shared.previous, memory.shared.current)
            # a span with more vectors: a new kernel tile; a shorter span: more spans may fit the budget; other
            # evidence (a new question's): another segment and other rows left out
            shapes = (memory.index.per_span_rows, candidates(memory), memory.evidence.generation)
            signature.append((*map(id, tensors), *shapes))
            held.append(tensors)
        return tuple(signature), held

    def _write_counts(self) -> None:
        if self._counts_read is not None:
            self._counts_read.synchronize()  # the last step's copy has read the host counts
        counts = [(memory.window.length, memory.index.n_vectors, memory.tokens_seen) for memory in self.memories]
        self.counts_host.numpy()[:] = counts  # one host write, then one copy to the device
        self.counts.copy_(self.counts_host, non_blocking=True)
        if self.device.type == "cuda":
            self._counts_read = torch.cuda.Event()
            self._counts_read.record()

    def _book(self) -> None:
        written = None
        if self.device.type == "cuda":
            written = torch.cuda.Event()
            written.record()
        for layer, memory in zip(self.layers, self.memories, strict=True):
            memory.after_captured_step(layer.chosen, written)
