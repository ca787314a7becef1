"""The ``ltri`` memory policy of one layer: sinks and window on the device, older tokens as stored spans.

    resident set = [sinks: first n_sink tokens] [retrieved spans, document order] [window: last n_window tokens]

A chunk of at least min_len tokens is cut into spans by its own attention while that is fresh
(``ltri.spans``); shorter pieces (decode steps, a short question) gather at the end of the window and
are cut into plain spans later. When tokens leave the window, their spans' payloads go to the span
store (LMDB) and the GPU span cache, and their index vectors to the layer's span index. Each chunk
or decode step then retrieves spans by its queries (``ltri.retrieval``).

Where the layer keeps its stored tokens in host rows (``MemoryConfig.host_payloads``), the rows are the payloads'
only copy until a save asks for the store (``store_deferred``), or the host runs short and the rows are dropped:
reading a text then writes nothing to the store, and takes no second copy of it in host memory or on disk.

Shapes: keys, values (1, nheads_kv, seqlen, headdim) pre-RoPE; a span payload is
(2, nheads_kv, span_len, headdim) (keys then values) in the model dtype.
"""

from __future__ import annotations

import warnings

import torch

from ltri.config import MemoryConfig, RetrievalConfig, SpanConfig
from ltri.deferred_segmentation import DeferredSegmentation
from ltri.evidence import Evidence, without_positions
from ltri.index import index_from_state, make_index, vector_dtype
from ltri.kernels.lowrank_scores import basis_of_covariance
from ltri.kernels.settled_votes import settled_votes
from ltri.memory import LayerMemory, ResidentSet
from ltri.offload.host_payloads import HostMemoryShort, HostPayloads, HostRowsSwitch
from ltri.offload.projected_keys import ProjectedKeys
from ltri.offload.span_cache import SpanCache
from ltri.offload.span_store import SpanStore
from ltri.pending_spans import PendingSpans
from ltri.positions import Layout
from ltri.repeat import concatenated_ranges, repeat_by_counts
from ltri.retrieval import Persistence, choose_spans, retrieval_queries
from ltri.shared_votes import SharedVotes
from ltri.span_tables import SpanTables
from ltri.span_vectors import IndexVectors, bound_query, key_bounds, top_attended_keys, vectors_per_span
from ltri.spans import Segmentation, segment
from ltri.token_buffer import TokenBuffer
from ltri.token_selection import TokenSelector, fit_basis, keys_covariance

HOST_FILL_SPANS = 4096  # spans read per batch when a reopened store's tokens go back into host rows
# Spans written per batch when the host rows' spans go to the store: the store's writer queues up to 64 batches,
# about 4 GB for a Llama-3-8B layer's spans of 15 tokens.
STORE_BATCH_SPANS = 1024


class SpanMemory(LayerMemory):
    # Set while something replaces votes (the needle oracle): decode steps then take the eager path.
    retrieval_overridden = False

    def __init__(
        self,
        layer: int,
        memory: MemoryConfig,
        spans: SpanConfig,
        retrieval: RetrievalConfig,
        store: SpanStore,
        cache_bytes: int,
        shared: SharedVotes | None = None,
        deferred: DeferredSegmentation | None = None,
        host_rows: HostRowsSwitch | None = None,
    ) -> None:
        """shared: the votes all layers of the model publish and borrow (None: this layer decides alone);
        deferred: where the layers' chunks wait to be cut together (None: each is cut at once);
        host_rows: whether the layers still keep host rows (shared by all layers; None: this layer's own)."""
        self.layer = layer
        self.memory_config, self.span_config, self.retrieval_config = memory, spans, retrieval
        self.store = store
        self.cache_bytes = cache_bytes
        self.shared = shared
        self.deferred = deferred
        self.host_rows = host_rows or HostRowsSwitch()
        self._waiting_cut = False  # this layer's chunk waits in deferred to be cut
        self.tables: SpanTables | None = None  # the stored spans' lengths and rows on the device
        self.host_payloads: HostPayloads | None = None  # the stored tokens in pinned host memory (MemoryConfig)
        self.projected_keys: ProjectedKeys | None = None  # Loki's projections of the host rows' keys (loki only)
        self.n_in_store = 0  # spans [0, n_in_store) are in the span store; later ones only in the host rows
        self.sinks = TokenBuffer(memory.n_sink)
        self.window = TokenBuffer()
        self.n_unsegmented = 0  # tokens at the end of the window not cut into spans yet
        self.pending = PendingSpans()
        self.span_starts = torch.empty(0, dtype=torch.long)  # (n_spans,) text position of each span's first token
        self.span_lengths = torch.empty(0, dtype=torch.long)  # (n_spans,)
        self.index = None  # created with the first stored span, when the shapes are known
        self.cache: SpanCache | None = None
        self.persistence = Persistence(retrieval.persistence)
        self._last_retrieved = torch.empty(0, dtype=torch.long)  # span ids the last step attended to
        self._captured_chosen = None  # (pinned ids, event, n_spans) a captured step wrote them to, until read
        self._loaded = None  # (span ids, their keys, values, positions) as the last step loaded them
        self.steps_since_retrieval = 0  # decode steps since the last retrieval (RetrievalConfig.refresh_every)
        self.rereading_from: int | None = None  # text position where the window read again starts (ltri.reread)
        self.rereading_evidence: torch.Tensor | None = None  # (n,) positions of the evidence read before it
        self.evidence = Evidence()  # stored tokens the last question's reread encoded anew
        self.spans_at_retrieval = 0  # spans stored when the last retrieval chose among them
        self._basis: torch.Tensor | None = None  # (nheads_kv, headdim, headdim) Loki's (the basis property)
        self._basis_covariance: torch.Tensor | None = None  # what it is fitted on, until it is asked for
        self.kv_shape: tuple[int, int] | None = None  # (nheads_kv, headdim)
        self.dtype: torch.dtype | None = None

    @property
    def last_retrieved(self) -> torch.Tensor:
        """Span ids (CPU, ascending) the last step attended to."""
        if self._captured_chosen is not None:
            chosen, written, n_spans = self._captured_chosen
            written.synchronize()
            self._last_retrieved = chosen[chosen < n_spans].clone()
            self._captured_chosen = None
        return self._last_retrieved

    @last_retrieved.setter
    def last_retrieved(self, span_ids: torch.Tensor) -> None:
        self._last_retrieved, self._captured_chosen = span_ids, None

    @property
    def n_spans(self) -> int:
        return self.span_lengths.numel()

    @property
    def window_start(self) -> int:
        """Text position of the window's first token: it follows the sinks and the stored spans (host counts only)."""
        return self.sinks.length + (0 if self.tables is None else self.tables.n_rows)

    @property
    def tokens_seen(self) -> int:
        """Tokens appended so far: each is a sink, in a stored span or in the window."""
        return self.window_start + self.window.length

    # ---- LayerMemory -------------------------------------------------------------------------
    def wants_chunk_attention(self, q_len: int) -> bool:
        if self.rereading_from is not None:
            return False
        config = self.span_config
        reads_attention = config.segmentation == "triangles" or config.index_vectors == "keys"
        return reads_attention and q_len >= config.min_len

    def append(self, keys, values, positions, chunk_attention=None) -> None:
        self.end_forward()
        if self.rereading_from is not None:
            n_evidence = 0 if self.rereading_evidence is None else self.rereading_evidence.numel()
            if n_evidence:
                self.evidence.keep(keys[:, :, :n_evidence], values[:, :, :n_evidence], self.rereading_evidence)
            self.window.overwrite_tail(keys[:, :, n_evidence:], values[:, :, n_evidence:])
            return
        self.kv_shape, self.dtype = (keys.shape[1], keys.shape[3]), keys.dtype
        n_sink = min(self.memory_config.n_sink - self.sinks.length, keys.shape[2])
        if n_sink > 0:
            self.sinks.append(keys[:, :, :n_sink], values[:, :, :n_sink], positions[:n_sink])
            keys, values, positions = keys[:, :, n_sink:], values[:, :, n_sink:], positions[n_sink:]
            if chunk_attention is not None:
                chunk_attention = chunk_attention[:, n_sink:, n_sink:]
        if keys.shape[2] == 0:
            return
        self._host_rows_ahead(keys.shape[2], keys.device)
        if chunk_attention is None or keys.shape[2] < self.span_config.min_len:
            self.window.append(keys, values, positions)
            self.n_unsegmented += keys.shape[2]
            if self.n_unsegmented >= self.span_config.max_len:
                self._cut_unsegmented()
        else:
            self._cut_unsegmented()
            self.window.append(keys, values, positions)
            self._cut_chunk(keys[0], chunk_attention)
            return
        self._evict()

    def end_forward(self) -> None:
        """Cut this layer's chunk if it still waits for the other layers' (then evict)."""
        if self._waiting_cut:
            self.deferred.flush()

    def resident(self, queries: torch.Tensor) -> ResidentSet | None:
        self.end_forward()
        if self.rereading_from is not None:
            return self._reread_resident(self.rereading_from)
        parts = [self.sinks] if self.sinks.length else []
        retrieved = self._retrieve(queries) if self.n_spans and self.retrieval_config.budget else None
        if self.evidence.length and retrieved is not None:
            retrieved = self.evidence.leave_out(*retrieved)
        if retrieved is not None and queries.shape[2] == 1 and self.retrieval_config.selector != "none":
            retrieved = self._select(queries, *retrieved)  # among the tokens the evidence does not hold
        n_retrieved = self.evidence.length + (0 if retrieved is None else retrieved[2].numel())
        keys = [buffer.keys() for buffer in parts]
        values = [buffer.values() for buffer in parts]
        positions = [buffer.positions() for buffer in parts]
        if retrieved is not None:
            keys.append(retrieved[0])
            values.append(retrieved[1])
            positions.append(retrieved[2])
        # the evidence right before the window, where the question's reread read it (ltri.reread)
        for buffer in (self.evidence.tokens, self.window):
            if buffer.length:
                keys.append(buffer.keys())
                values.append(buffer.values())
                positions.append(buffer.positions())
        if not keys:
            return None
        layout = Layout(self.sinks.length, n_retrieved, self.window.length)
        return ResidentSet(tuple(keys), tuple(values), torch.cat(positions), layout)

    def retrieval_state(self) -> tuple:
        """What the last retrieval left for the steps that follow (loaded spans, spans it chose among, votes):
        ``restore_retrieval_state`` brings it back after a draft (``ltri.draft``)."""
        votes = self.persistence.buffer.clone()
        return self._loaded, self.spans_at_retrieval, self.last_retrieved, votes, self.steps_since_retrieval

    def restore_retrieval_state(self, state: tuple) -> None:
        self._loaded, self.spans_at_retrieval, self.last_retrieved, votes, self.steps_since_retrieval = state
        self.persistence.restore(votes)

    def forgettable_tokens(self) -> int:
        """How many more tokens this layer can take and still forget (``forget_last``): until it would cut its
        window's unsegmented tail into spans."""
        return max(0, self.span_config.max_len - 1 - self.n_unsegmented)

    def forget_last(self, n_tokens: int) -> None:
        """Drop the last n_tokens appended, which must be the window's unsegmented tail (a draft's, ``ltri.draft``)."""
        if n_tokens > self.n_unsegmented:
            raise ValueError(f"only the {self.n_unsegmented} unsegmented tokens can be forgotten, not {n_tokens}")
        self.window.drop_last(n_tokens)
        self.n_unsegmented -= n_tokens

    def unseen_by_retrieval(self) -> int | None:
        """Text position of the first token that is neither a sink nor in a span the last retrieval could choose
        (the window's start, or an earlier one if spans left the window since); None before any retrieval."""
        if self._loaded is None:
            return None
        if self.spans_at_retrieval < self.n_spans:
            return int(self.span_starts[self.spans_at_retrieval])
        return self.window_start

    def _reread_resident(self, chunk_start: int) -> ResidentSet | None:
        """While the window is read again from text position chunk_start on: the sinks and the tokens before
        chunk_start of the spans the last retrieval loaded (later ones, and the evidence, are in the chunk)."""
        pieces = [(self.sinks.keys(), self.sinks.values(), self.sinks.positions())] if self.sinks.length else []
        if self._loaded is not None:
            keys, values, positions = self._loaded[1]  # the spans retrieved last, in document order
            before = positions < chunk_start
            loaded = keys[:, :, before], values[:, :, before], positions[before]
            if self.rereading_evidence is not None:
                loaded = without_positions(*loaded, self.rereading_evidence)
            pieces.append(loaded)
        if not pieces:
            return None
        keys, values, positions = zip(*pieces, strict=True)
        n_retrieved = sum(piece.numel() for piece in positions) - self.sinks.length
        return ResidentSet(keys, values, torch.cat(positions), Layout(self.sinks.length, n_retrieved, 0))

    def resident_tokens(self) -> int:
        retrieved = int(self.span_lengths[self.last_retrieved].sum())
        return self.sinks.length + retrieved + self.evidence.length + self.window.length

    def nbytes(self) -> int:
        cached = 0 if self.cache is None else self.cache.nbytes()
        return self.sinks.nbytes() + self.window.nbytes() + cached

    def host_row_bytes(self) -> int:
        """Pinned host memory the layer's host rows hold: the stored tokens', and Loki's projections of their keys."""
        kept = (self.host_payloads, None if self.projected_keys is None else self.projected_keys.rows)
        return sum(rows.nbytes() for rows in kept if rows is not None)

    # ---- captured decode steps (ltri.captured_decode) ------------------------------------------
    def captured_ready(self) -> bool:
        """Whether a decode step of this layer can run in fixed shapes: stored spans with every token in host
        rows, sinks full, the torch index, no reread under way, and a retrieval with no per-step host choices (the
        evidence a reread left resident is fine: the step packs it between retrieved tokens and window; so is a
        token selection, which the step makes on the device)."""
        config = self.retrieval_config
        return (
            self.n_spans > 0
            and config.budget > 0
            and config.refresh_every == 1
            and not SpanMemory.retrieval_overridden
            and self.host_payloads is not None
            and self.host_payloads.length == self.tables.n_rows
            and self.sinks.length == self.memory_config.n_sink
            and self.rereading_from is None
            and not self._waiting_cut
            and hasattr(self.index, "search_captured")
            and self.index.n_spans == self.n_spans
        )

    def after_captured_step(self, chosen: torch.Tensor, written: torch.cuda.Event | None) -> None:
        """Book what a captured step did in place: one token written after the window's, spans chosen into the
        host tensor chosen (padding >= n_spans) once written completes. Then cut and evict as append would."""
        self.window.count_written(1)
        self.spans_at_retrieval = self.n_spans
        self._captured_chosen = (chosen, written or _DoneEvent(), self.n_spans)
        self._loaded = None
        self.n_unsegmented += 1
        if self.n_unsegmented >= self.span_config.max_len:
            self._cut_unsegmented()
        self._evict()

    # ---- token selection ---------------------------------------------------------------------
    @property
    def basis(self) -> torch.Tensor | None:
        """Loki's basis (nheads_kv, headdim, headdim) float32, fitted on the keys resident at the first eviction.
        The eviction keeps their covariance; its eigendecomposition, which waits for the device, runs when the
        basis is first asked for (a Loki selection, a save), not in the prefill (benchmarks/speed/NOTES.md step
        22), except with the loki selector and host rows, whose stored projections need it from the first eviction
        on (``stored_projections``). None before the first eviction."""
        if self._basis is None and self._basis_covariance is not None:
            self._basis, self._basis_covariance = basis_of_covariance(self._basis_covariance), None
        return self._basis

    @basis.setter
    def basis(self, basis: torch.Tensor | None) -> None:
        self._basis, self._basis_covariance = basis, None

    def token_selector(self) -> TokenSelector:
        config = self.retrieval_config
        if config.selector == "loki" and self.basis is None:  # a store saved before bases were kept
            self.basis = fit_basis(self._resident_keys())
        return TokenSelector(config.selector, config.select_tokens, config.select_rank, self.basis)

    def stored_projections(self, stored_keys: torch.Tensor | None = None) -> ProjectedKeys | None:
        """Loki's projections of every token in the host rows (made, or caught up, now); None without the loki
        selector or host rows. stored_keys (nheads_kv, n, headdim): the tokens the host rows took last, where the
        caller has them (``ProjectedKeys.catch_up``)."""
        if self.retrieval_config.selector != "loki" or self.host_payloads is None:
            return None
        if self.projected_keys is None:
            selector = self.token_selector()  # the basis decomposed now (once a layer)
            self.projected_keys = ProjectedKeys(selector.basis, selector.scored_width, self.host_payloads.dtype)
        self.projected_keys.catch_up(self.host_payloads, stored_keys)
        return self.projected_keys

    def _resident_keys(self) -> list[torch.Tensor]:
        return [buffer.keys() for buffer in (self.sinks, self.window) if buffer.length]

    def _select(self, queries, keys, values, positions):
        """Each KV head's select_tokens best retrieved tokens for a decode step (``ltri.token_selection``).

        The positions returned are KV head 0's: the position modes that allow a selector (compact,
        one_angle) place the retrieved tokens by the layout alone.
        """
        stored = None
        projections = self.stored_projections()
        if projections is not None:  # the retrieved tokens' rows in the host rows are their positions' (_load)
            stored = (projections.scored(), (positions - self.sinks.length).to(projections.basis.device))
        keys, values, indices = self.token_selector().select(queries, keys, values, stored)
        if indices is not None:
            positions = positions[indices[0]]
        return keys, values, positions

    # ---- segmentation ------------------------------------------------------------------------
    def _cut_chunk(self, keys: torch.Tensor, attention: torch.Tensor) -> None:
        """Cut a fresh chunk into pending spans and evict: keys (nheads_kv, n, headdim), attention (nheads_kv, n, n).

        Triangles are cut at the end of the forward with every layer's (``ltri.deferred_segmentation``)
        when the layers share a DeferredSegmentation, else now; fixed blocks now."""
        config = self.span_config
        if config.segmentation == "fixed":
            self._add_spans(keys, attention, fixed_segmentation(keys.shape[1], config.max_len, keys.device))
        elif self.deferred is None:
            cut = segment(attention.mean(dim=0), config.theta, config.min_len, config.max_len, config.nms_iou)
            self._add_spans(keys, attention, cut)
        else:
            self._waiting_cut = True
            by_keys = config.index_vectors == "keys"  # then the index vectors of all layers are chosen together
            self.deferred.add(
                attention.mean(dim=0),
                config,
                lambda cut, made: self._finish_cut(keys, attention, cut, made),
                keys if by_keys else None,
                attention if by_keys else None,
            )

    def _finish_cut(
        self, keys: torch.Tensor, attention: torch.Tensor, segmentation: Segmentation, made: IndexVectors | None
    ) -> None:
        self._waiting_cut = False
        self._add_spans(keys, attention, segmentation, made)

    def _add_spans(
        self, keys: torch.Tensor, attention: torch.Tensor, segmentation: Segmentation, made: IndexVectors | None = None
    ) -> None:
        """The chunk's spans, with their index vectors (made already, or chosen here), join the pending ones; then
        the oldest may leave."""
        config = self.span_config
        if made is not None:
            self.pending.add(made.lengths, made.vectors, made.span_of_vector)
        elif config.index_vectors == "bounds":
            vectors = key_bounds(keys, segmentation)
            self.pending.add(segmentation.lengths, vectors, torch.arange(vectors.shape[1]))
        else:
            counts = vectors_per_span(segmentation, config.max_vectors)
            vectors, owner = top_attended_keys(keys, attention, segmentation, counts)
            self.pending.add(segmentation.lengths, vectors, owner)
        self._evict()

    def _cut_unsegmented(self) -> None:
        """Cut the window's unsegmented tail into near-equal spans of at most max_len tokens."""
        n = self.n_unsegmented
        if n == 0:
            return
        keys = self.window.keys()[0, :, -n:]
        cut = fixed_segmentation if self.span_config.segmentation == "fixed" else even_segmentation
        segmentation = cut(n, self.span_config.max_len, keys.device)
        if self.span_config.index_vectors == "bounds":
            vectors = key_bounds(keys, segmentation)
        else:
            vectors = span_means(keys, segmentation)
        self.pending.add(segmentation.ends - segmentation.starts, vectors, torch.arange(vectors.shape[1]))
        self.n_unsegmented = 0

    # ---- eviction ----------------------------------------------------------------------------
    def _evict(self) -> None:
        """Move the oldest pending spans to the store while the window keeps at least n_window tokens."""
        n_window = self.memory_config.n_window
        if self.n_unsegmented > n_window + self.span_config.max_len:
            self._cut_unsegmented()
        n_leaving = self.pending.spans_to_leave(self.window.length, n_window)
        if n_leaving == 0:
            return
        lengths, vectors, owner = self.pending.pop(n_leaving)
        n_tokens = int(lengths.sum())
        span_ids = torch.arange(self.n_spans, self.n_spans + n_leaving)
        # The window holds consecutive text positions after the sinks and the stored spans: no device read.
        starts = self.window_start + torch.cumsum(lengths, dim=0) - lengths  # before the tables count them
        keys, values = self.window.keys()[0, :, :n_tokens], self.window.values()[0, :, :n_tokens]
        self._ensure_index_and_cache(vectors, keys.device)
        self.index.add(vectors, span_ids[owner])  # host ids: the index keeps its slot tables on the host
        self.tables.extend(lengths)
        self.span_starts = torch.cat([self.span_starts, starts])
        self.span_lengths = torch.cat([self.span_lengths, lengths])
        if not self._keep_on_host(keys, values):  # retrieval reads the host rows while they are kept (_load)
            pieces = span_payloads(keys, values, lengths)
            self.cache.put_block(span_ids.tolist(), pieces)
            self.store.put_spans(self.layer, span_ids.tolist(), pieces)
            self.n_in_store = self.n_spans
        self.window.keep(0, self.window.length - n_tokens)

    def _ensure_index_and_cache(self, vectors: torch.Tensor, device) -> None:
        if self._basis is None and self._basis_covariance is None:
            self._basis_covariance = keys_covariance(self._resident_keys()).to(device)
        if self.index is None:
            nheads_kv, _, dim = vectors.shape
            dtype = vector_dtype(self.dtype, device)
            self.index = make_index(self.retrieval_config.backend, nheads_kv, dim, device, dtype)
        if self.cache is None:
            self.cache = SpanCache(self.store, self.layer, self.cache_bytes, device)
        if self.tables is None:
            self.tables = SpanTables(device)
            if self.host_payloads is None:  # else made ahead (_host_rows_ahead)
                self.host_payloads = self._new_host_payloads(device)

    def _host_rows_ahead(self, n_coming: int, device) -> None:
        """Before the first eviction: once n_coming more tokens take the window past what it keeps, make the host
        rows and start locking their first piece on the registration thread. The chunk's evictions run after every
        layer's forward (deferred segmentation), so the first append seldom waits for that registration, which
        took 6.7 ms a layer on the main thread (benchmarks/speed/NOTES.md step 23)."""
        if self.tables is not None or self.host_payloads is not None:
            return
        if self.window.length + n_coming <= self.memory_config.n_window:
            return
        self.host_payloads = self._new_host_payloads(device)
        if self.host_payloads is not None:
            self.host_payloads.lock_ahead()

    def _new_host_payloads(self, device) -> HostPayloads | None:
        """Pinned host rows for the stored tokens, where MemoryConfig.host_payloads asks for them (a new memory's)."""
        if not self.host_rows.on or not self.memory_config.keeps_host_rows(device):
            return None
        nheads_kv, headdim = self.kv_shape
        return HostPayloads(nheads_kv, headdim, self.dtype, device)

    def _keep_on_host(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """The leaving tokens (nheads_kv, n, headdim) join the host rows: True when the rows took them. When the
        host runs short the rows are dropped for good, once the spans only they hold are in the store; decode
        steps then read spans through the span cache, and the store takes every new span."""
        if self.host_payloads is None:
            return False
        try:
            if self.host_rows.on:
                self.host_payloads.append(keys, values)
                self.stored_projections(keys)
                return True
        except HostMemoryShort as short:
            warnings.warn(f"stored tokens no longer kept in host memory ({short})", stacklevel=2)
            self.host_rows.on = False
        self.drop_host_rows()
        return False

    def drop_host_rows(self) -> None:
        """Stop keeping the stored tokens in host rows, once the spans only they hold are in the store."""
        self.store_deferred()
        self.release()

    def release(self) -> None:
        """The host rows given back without storing what only they hold (the session is done with this memory)."""
        if self.projected_keys is not None:
            self.projected_keys.close()
            self.projected_keys = None
        if self.host_payloads is not None:
            self.host_payloads.close()
            self.host_payloads = None

    def store_deferred(self) -> None:
        """Write to the span store the spans only the host rows hold (a save needs every span there)."""
        rows = self.host_payloads
        if rows is None:
            return
        ends = self.span_starts - self.sinks.length + self.span_lengths  # (n_spans,) each span's end row
        in_rows = int(torch.searchsorted(ends, rows.length, right=True))
        if in_rows <= self.n_in_store:
            return
        if rows.device.type == "cuda":
            torch.cuda.synchronize(rows.device)  # the rows are filled by copies the device may still run
        for batch in torch.arange(self.n_in_store, in_rows).split(STORE_BATCH_SPANS):
            lengths = self.span_lengths[batch]
            first, last = int(ends[batch[0]] - lengths[0]), int(ends[batch[-1]])
            block = rows.tokens[first:last]  # (n, 2, nheads_kv, headdim)
            pieces = span_payloads(block[:, 0].transpose(0, 1), block[:, 1].transpose(0, 1), lengths)
            self.store.put_spans(self.layer, batch.tolist(), pieces)
        self.n_in_store = in_rows

    # ---- retrieval ---------------------------------------------------------------------------
    def _retrieve(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Spans for queries (1, nheads, q_len, headdim): keys, values (1, nheads_kv, n, headdim), positions (n,)."""
        if self._reuses_last_retrieval(queries.shape[2]):
            return self._loaded[1]
        config = self.retrieval_config
        scores, span_ids = self.index.search(self.search_queries(queries), min(config.search_k, self.n_spans))
        if self.shares_votes:
            self.shared.begin_step(self.tokens_seen)
        reading = queries.shape[2] > config.max_voting_queries  # a long chunk votes with mean queries
        votes = self.votes(scores, span_ids, self.n_spans, self.tables.n_rows, reading)
        lengths = self.tables.lengths[: self.n_spans]
        chosen = choose_spans(votes, lengths, config.budget, self.tables.spans_fitting(config.budget))
        self.last_retrieved = chosen
        self.spans_at_retrieval = self.n_spans
        if self._loaded is None or not torch.equal(self._loaded[0], chosen):
            self._loaded = (chosen, self._load(chosen, queries.device))
        return self._loaded[1]

    def _reuses_last_retrieval(self, q_len: int) -> bool:
        """Whether this step attends to the spans the last retrieval loaded (decode steps between refreshes)."""
        if q_len > 1 or self._loaded is None:
            self.steps_since_retrieval = 0
            return False
        self.steps_since_retrieval += 1
        refresh_every = self.retrieval_config.refresh_every
        if refresh_every == 0 or self.steps_since_retrieval % refresh_every:
            return True
        self.steps_since_retrieval = 0
        return False

    @property
    def shares_votes(self) -> bool:
        return self.shared is not None and self.retrieval_config.collaboration > 0

    def search_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """What queries (1, nheads, q_len, headdim) ask the index with: (nheads_kv, n_ask, dim) (ltri.retrieval)."""
        config = self.retrieval_config
        search = retrieval_queries(queries, self.kv_shape[0], config.max_voting_queries, config.voting_window)
        return bound_query(search) if self.span_config.index_vectors == "bounds" else search

    def votes(
        self, scores: torch.Tensor, span_ids: torch.Tensor, n_slots: int, n_rows: int, reading: bool = False
    ) -> torch.Tensor:
        """Each span slot's vote (n_slots,) from the index's results: pooled, raised by what other layers published
        for its tokens, faded with the last steps' (the shared votes' step begun already), and remembered by
        persistence for the next steps; in three launches on CUDA (``kernels.settled_votes``).

        n_slots: spans voted on (the stored ones, or a captured step's whole table); n_rows: stored rows of the
        table the shared votes read and publish (the stored ones, or the whole table); reading: a long chunk's mean
        queries asked (pooled by ``reading_vote``, else by ``vote``)."""
        config = self.retrieval_config
        how = (config.reading_vote or config.vote) if reading else config.vote
        shared = None
        if self.shares_votes:
            tables = self.tables
            shared = self.shared.args(
                self.sinks.length, tables.first_rows, tables.lengths, tables.owner[:n_rows], self.span_config.max_len,
                config.collaboration,
            )  # stored rows start after the sinks  # fmt: skip
        persist = self.persistence.args(n_slots, scores.device)
        return settled_votes(scores, span_ids, n_slots, self.kv_shape[1] ** -0.5, how, shared, persist)

    def _load(self, span_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tokens of span_ids (CPU, ascending): keys, values (1, nheads_kv, n, headdim), positions (n,) on device.

        From the host rows while the layer keeps them (every stored token is there: one gather on the device, read
        over PCIe on CUDA, as a captured decode step reads them), else through the span cache (the store's spans)."""
        nheads_kv, headdim = self.kv_shape
        lengths = self.span_lengths[span_ids]
        if span_ids.numel() == 0:
            empty = torch.empty(1, nheads_kv, 0, headdim, dtype=self.dtype, device=device)
            return empty, empty, torch.empty(0, dtype=torch.long, device=device)
        positions = concatenated_ranges(self.span_starts[span_ids], lengths, int(lengths.sum()))
        if positions.device != torch.device(device):
            positions = positions.pin_memory().to(device, non_blocking=True)  # no wait for the device's queue
        if self.host_payloads is not None:
            view = self.host_payloads.device_view()  # (max_tokens, 2, nheads_kv, headdim), row = position - n_sink
            rows = view.index_select(0, (positions - self.sinks.length).to(view.device))
            payload = rows.permute(1, 2, 0, 3).to(device=device, dtype=self.dtype).contiguous()
        else:
            shapes = [(2, nheads_kv, int(length), headdim) for length in lengths]
            payload = torch.cat(self.cache.get(span_ids.tolist(), shapes, self.dtype), dim=2)
        return payload[0][None], payload[1][None], positions  # payload (2, nheads_kv, n, headdim)

    # ---- persistence ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything but the stored payloads, on the CPU."""
        self.end_forward()
        return {
            "sinks": self.sinks.state(),
            "window": self.window.state(),
            "n_unsegmented": self.n_unsegmented,
            "pending": self.pending.state(),
            "span_starts": self.span_starts,
            "span_lengths": self.span_lengths,
            "index": None if self.index is None else self.index.state(),
            "persistence": self.persistence.state(),
            "basis": None if self.basis is None else self.basis.cpu(),
            # The layers share one SharedVotes: the first layer saves and restores it for all.
            "shared": self.shared.state() if self.shared is not None and self.layer == 0 else None,
            "kv_shape": self.kv_shape,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
        }

    def load_state(self, state: dict, device) -> None:
        self.sinks.load_state(state["sinks"], device)
        self.window.load_state(state["window"], device)
        self.n_unsegmented = int(state["n_unsegmented"])
        self.pending.load_state(state["pending"], device)
        self.span_starts, self.span_lengths = state["span_starts"], state["span_lengths"]
        self.persistence.load_state(state["persistence"], device)
        basis = state.get("basis")  # absent in stores saved before Loki's basis was kept
        self.basis = None if basis is None else basis.to(device)
        if state["shared"] is not None and self.shared is not None:
            self.shared.load_state(state["shared"], device)
        self.kv_shape = None if state["kv_shape"] is None else tuple(state["kv_shape"])
        self.dtype = None if state["dtype"] is None else getattr(torch, state["dtype"])
        if state["index"] is not None:
            dtype = vector_dtype(self.dtype, device)
            self.index = index_from_state(self.retrieval_config.backend, state["index"], device, dtype)
            self.cache = SpanCache(self.store, self.layer, self.cache_bytes, device)
            self.tables = SpanTables(device)
            self.tables.extend(self.span_lengths)
            self.n_in_store = self.n_spans  # a saved store holds every span
            self.host_payloads = self._new_host_payloads(device)
            self._fill_host_rows()

    def _fill_host_rows(self) -> None:
        """A reopened store's tokens read back into new host rows, a batch of spans at a time (through the
        host, not the GPU)."""
        nheads_kv, headdim = self.kv_shape
        for batch in torch.arange(self.n_spans).split(HOST_FILL_SPANS):
            if self.host_payloads is None:  # the host ran short (_keep_on_host)
                return
            shapes = [(2, nheads_kv, int(length), headdim) for length in self.span_lengths[batch]]
            block = torch.cat(self.store.read_spans(self.layer, batch.tolist(), shapes, self.dtype, "cpu"), dim=2)
            self._keep_on_host(block[0], block[1])


class _DoneEvent:
    """An event already complete (steps run eagerly on a CPU)."""

    def synchronize(self) -> None:
        return None


def span_payloads(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive spans' payloads as contiguous views of one block, made by one gather.

    keys, values: (nheads_kv, n, headdim) the spans' tokens in order; lengths: (n_spans,) CPU, summing to n.
    Returns n_spans tensors (2, nheads_kv, length, headdim) (keys then values), span after span in the block.
    """
    nheads_kv, n, headdim = keys.shape
    rows = 2 * nheads_kv  # (keys, values) x heads: the block's row groups, each n tokens long
    stacked = torch.stack([keys, values]).view(rows * n, headdim)
    piece_lengths = lengths.repeat_interleave(rows)  # (n_spans * rows,) one piece per span and row group
    piece_starts = torch.arange(rows).repeat(lengths.numel()) * n + (
        torch.cumsum(lengths, 0) - lengths
    ).repeat_interleave(rows)
    index = concatenated_ranges(piece_starts, piece_lengths, rows * n)
    block = stacked.index_select(0, index.to(keys.device, non_blocking=True))  # (rows * n, headdim) span-major
    sizes = (lengths * rows).tolist()
    return [
        piece.view(2, nheads_kv, size // rows, headdim) for piece, size in zip(block.split(sizes), sizes, strict=True)
    ]


def even_segmentation(n: int, max_len: int, device) -> Segmentation:
    """n tokens cut into ceil(n / max_len) spans of near-equal length."""
    n_spans = -(-n // max_len)
    bounds = torch.div(torch.arange(n_spans + 1, device=device) * n, n_spans, rounding_mode="floor")
    zeros = torch.zeros(n_spans, device=device)
    return Segmentation(bounds[:-1], bounds[1:], zeros, zeros.bool())


def fixed_segmentation(n: int, length: int, device) -> Segmentation:
    """n tokens cut into blocks of exactly length tokens, the last one shorter when length does not divide n."""
    starts = torch.arange(0, n, length, device=device)
    zeros = torch.zeros(starts.numel(), device=device)
    return Segmentation(starts, torch.clamp(starts + length, max=n), zeros, zeros.bool())


def span_means(keys: torch.Tensor, segmentation: Segmentation) -> torch.Tensor:
    """Mean key of each span: keys (nheads_kv, n, headdim) -> (nheads_kv, n_spans, headdim)."""
    lengths = segmentation.ends - segmentation.starts
    owner = repeat_by_counts(None, lengths, keys.shape[1])  # lengths are on the keys' device
    sums = torch.zeros(keys.shape[0], lengths.numel(), keys.shape[2], dtype=torch.float32, device=keys.device)
    sums.index_add_(1, owner, keys.float())
    return (sums / lengths[None, :, None]).to(keys.dtype)
