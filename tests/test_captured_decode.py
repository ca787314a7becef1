"""Captured decode steps (ltri.captured_decode) attend to what the eager decode step attends to.

The captured step reads only fixed-shape device tensors: it must choose the same spans, gather the same
tokens from the host rows, pack them at the same compact positions and give the same logits as the
eager step, over many steps, across cuts and evictions, with shared votes and persistence carried
between steps. On a CPU the same code runs eagerly (MemoryConfig.host_payloads="always"); on CUDA it
runs as one graph.
"""

import pytest
import torch
from captured_sessions import LOKI, SPARQ, TEXT, decode, session_for
from ltri.kernels.budget_rows import span_token_rows
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session
from ltri.captured_decode import CACHE_KINDS, WINDOW_HEADROOM, CapturedDecode
from ltri.evidence import Evidence, rows_not_held
from ltri.filler import text_with_fact
from ltri.offload import host_payloads
from ltri.offload.host_payloads import HostPayloads
from ltri.retrieval import choose_spans, chosen_spans_padded

QUEST_LIKE = {"segmentation": "fixed", "index_vectors": "bounds"}


@pytest.mark.parametrize(
    "spans, retrieval",
    [
        (None, {}),
        (None, {"vote": "max", "collaboration": 0.0}),
        (None, {"persistence": 0.0}),
        (QUEST_LIKE, {}),
        (None, SPARQ),
        (None, LOKI),
    ],
)
def test_captured_steps_equal_eager_steps_on_the_cpu(spans, retrieval):
    eager = session_for("never", spans=spans, **retrieval)
    captured = session_for("always", spans=spans, **retrieval)
    expected, expected_spans = decode(eager, 40)
    got, got_spans = decode(captured, 40)
    steps = captured._captured.steps
    assert steps["declined"] == 0 and steps["bound"] + steps["eager"] == 40  # every step took the captured path
    selecting = [layer.selector is not None for layer in captured._captured.layers]
    assert selecting == ["selector" in retrieval] * 3  # a selector narrows the budget's tokens in the step
    assert eager._captured is None or eager._captured.layers is None
    assert got_spans == expected_spans
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("retrieval", [{}, SPARQ, LOKI], ids=["shared", "sparq", "loki"])
def test_the_row_cache_holds_the_last_steps_rows_and_can_be_turned_off(retrieval):
    """Each layer's row cache (``ltri.offload.row_cache``) holds the rows its last step retrieved (with a selector, each
    KV head's selected rows in its part of the rows, a slot each per head, and a second cache the candidates' keys
    (SparQ) or projections (Loki)), the rows' own values; without it the steps read every row from the host rows, to
    the same logits."""
    cached = session_for("always", **retrieval)
    expected, expected_spans = decode(session_for("never", **retrieval), 12)
    got, got_spans = decode(cached, 12)
    uncached = session_for("always", row_cache=False, **retrieval)
    plain, plain_spans = decode(uncached, 12)
    assert got_spans == expected_spans == plain_spans
    assert (got - expected).abs().max().item() < 1e-4 and (plain - expected).abs().max().item() < 1e-4
    assert all(layer.row_cache is None for layer in uncached._captured.layers)
    for layer in cached._captured.layers:
        cache, tokens = layer.row_cache, layer.memory.host_payloads.tokens  # tokens (n, 2, nheads_kv, headdim)
        nheads_kv = tokens.shape[2]
        slots, held = cache.slots.view(-1, cache.slots.shape[-1]), cache.held.view(-1, cache.held.shape[-1])
        assert slots.shape[0] == (nheads_kv if retrieval else 1)
        for head in range(nheads_kv):
            count, by_head = int(cache.count[0]), head if retrieval else 0
            rows = held[by_head, :count]
            assert count > 0 and torch.equal(cache.rows[:count, :, head], tokens[rows, :, head])
            assert torch.equal(slots[by_head, rows], torch.arange(count, dtype=torch.int32))
            assert int((slots[by_head] >= 0).sum()) == count
        if retrieval:
            assert count == layer.selector.n_tokens and not torch.equal(held[0], held[1])  # the heads' own rows
        candidate_cache = layer.candidate_cache  # what the selector's scores read of the last step's candidates
        assert (candidate_cache is not None) == bool(retrieval)
        if candidate_cache is not None:
            count, rows = int(candidate_cache.count[0]), candidate_cache.held[: int(candidate_cache.count[0])]
            assert count > layer.selector.n_tokens  # the candidates: more rows than a head keeps
            scored = layer.projections.rows.tokens if retrieval is LOKI else tokens[:, 0]  # projections or keys
            assert torch.equal(candidate_cache.rows[:count], scored[rows])
            assert torch.equal(candidate_cache.slots[rows], torch.arange(count, dtype=torch.int32))
    caches = [layer.row_cache for layer in cached._captured.layers]
    caches += [layer.candidate_cache for layer in cached._captured.layers if layer.candidate_cache is not None]
    for cache in caches:
        hits, retrieved = cache.hits.tolist()
        assert 0 < hits <= retrieved  # consecutive steps retrieve (and select) rows the cache holds


def test_steps_fall_back_to_eager_while_a_layer_cannot_be_captured():
    session = session_for("always")
    session.prefill(TEXT)
    memory = session.cache.memories()[1]
    memory.drop_host_rows()  # as when the host ran short of memory
    reference = session_for("never")
    reference.prefill(TEXT)
    got = session.prefill([5])
    assert session._captured.layers is None  # nothing bound: the step was eager
    assert torch.allclose(got, reference.prefill([5]), atol=1e-5)


def test_the_budget_is_filled_on_the_device_as_on_the_host():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        votes = torch.randn(n, generator=generator)
        votes[torch.rand(n, generator=generator) < 0.3] = float("-inf")
        lengths = torch.randint(1, 20, (n,), generator=generator)
        budget = int(torch.randint(0, 120, (1,), generator=generator))
        chosen = chosen_spans_padded(votes, lengths, budget)
        expected = choose_spans(votes, lengths, budget)
        assert chosen.numel() == min(n, budget)
        assert torch.equal(chosen[: expected.numel()], expected)
        assert bool((chosen[expected.numel() :] == n).all())


def test_span_token_rows_lists_each_chosen_spans_rows_in_order():
    lengths = torch.tensor([3, 2, 4, 0])  # three spans, then the empty span
    first_rows = torch.tensor([0, 3, 5, 0])
    chosen = torch.tensor([0, 2, 4, 4])  # spans 0 and 2, then padding (past the empty span: clamped to it)
    rows, count = span_token_rows(chosen, lengths, first_rows, n_rows=10)
    assert int(count) == 7
    assert rows.tolist() == [0, 1, 2, 5, 6, 7, 8, 0, 0, 0]
    rows, count = span_token_rows(chosen, lengths, first_rows, n_rows=5)
    assert int(count) == 5 and rows.tolist() == [0, 1, 2, 5, 6]


def test_host_rows_hold_what_left_the_window_and_a_save_writes_it_to_the_store(monkeypatch):
    """The host rows are the stored tokens' only copy while reading; a save writes them to the span store (in
    batches of 7 spans here), and retrieval reads the same payloads from the rows."""
    monkeypatch.setattr("ltri.span_memory.STORE_BATCH_SPANS", 7)
    session = session_for("always")
    session.prefill(TEXT)
    assert session.stats().store_bytes == 0
    session.save()
    n_rows = sum(memory.tables.n_rows for memory in session.cache.memories())
    assert session.stats().store_bytes == n_rows * 2 * 2 * 16 * 4  # keys and values, 2 KV heads, head dim 16, f32
    for memory in session.cache.memories():
        rows = memory.host_payloads
        assert rows.length == memory.tables.n_rows == int(memory.span_lengths.sum())
        assert memory.n_in_store == memory.n_spans > 7
        shapes = [(2, 2, int(length), 16) for length in memory.span_lengths]
        ids = list(range(memory.n_spans))
        stored = memory.store.read_spans(memory.layer, ids, shapes, torch.float32, "cpu")
        for span, payload in zip(ids, stored, strict=True):
            first = int(memory.span_starts[span]) - memory.sinks.length
            expected = rows.tokens[first : first + payload.shape[2]].permute(1, 2, 0, 3)
            assert torch.equal(payload, expected)
        keys, values, positions = memory._load(torch.arange(memory.n_spans - 1, -1, -3).flip(0), "cpu")
        expected = rows.tokens[positions - memory.sinks.length].permute(1, 2, 0, 3)  # (2, nheads_kv, n, headdim)
        assert torch.equal(keys[0], expected[0]) and torch.equal(values[0], expected[1])


def test_host_rows_need_no_copy_to_grow():
    rows = HostPayloads(2, 16, torch.float32, "cpu", max_tokens=1000)
    view = rows.device_view()
    keys = torch.randn(2, 600, 16)
    rows.append(keys, -keys)
    rows.append(keys[:, :300], keys[:, :300])
    assert rows.device_view() is view and rows.length == 900
    assert torch.equal(view[650, 0], keys[:, 50])
    with pytest.raises(RuntimeError, match="exceed"):
        rows.append(keys[:, :200], keys[:, :200])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("graphs, retrieval", [(False, {}), (True, {}), (True, SPARQ), (True, LOKI)])
def test_captured_steps_equal_eager_steps_on_the_gpu(graphs, retrieval):
    sessions = []
    for where in ("never", "cuda"):
        sessions.append(session_for(where, "cuda", torch.bfloat16, **retrieval))
    if not graphs:
        sessions[1]._captured = CapturedDecode(
            sessions[1]._decode_step, sessions[1].cache.memories(), sessions[1].rotary, "cuda", use_graph=False
        )
    expected, expected_spans = decode(sessions[0], 40)
    got, got_spans = decode(sessions[1], 40)
    assert sessions[1]._captured.layers is not None
    assert sessions[1]._captured.use_graph == graphs
    assert graphs is False or sessions[1]._captured.graph is not None
    agreeing = sum(a == b for a, b in zip(got_spans, expected_spans, strict=True))
    assert agreeing >= 35  # bf16: a near tie may go the other way now and then
    assert (got - expected).abs().max().item() < 0.1


def test_copies_into_host_rows_are_cut_where_a_registration_ends():
    locked = host_payloads._LockedPrefix(address=0)
    locked.pieces, locked.nbytes = [(0, 100), (100, 50), (150, 200)], 350
    assert locked.split(90, 160) == [(90, 100), (100, 150), (150, 160)]
    assert locked.split(120, 130) == [(120, 130)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="registered host memory needs a GPU")
def test_host_rows_across_many_registrations_read_back_on_the_gpu(monkeypatch):
    monkeypatch.setattr(host_payloads, "_LOCK_STEP_BYTES", 3 * 4096)
    monkeypatch.setattr(host_payloads, "_FIRST_LOCK_BYTES", 3 * 4096)
    monkeypatch.setattr(host_payloads, "_HUGE_PAGE", 4096)
    rows = HostPayloads(2, 16, torch.bfloat16, "cuda", max_tokens=4096)  # 128 bytes a row
    keys = torch.randn(2, 1000, 16, device="cuda", dtype=torch.bfloat16)
    for start in range(0, 1000, 77):  # appends that straddle registrations
        rows.append(keys[:, start : start + 77], -keys[:, start : start + 77])
    assert len(rows._locked.pieces) > 3
    picked = torch.tensor([0, 95, 96, 500, 999], device="cuda")
    got = rows.device_view().index_select(0, picked)
    assert torch.equal(got[:, 0], keys[:, picked].transpose(0, 1))
    assert torch.equal(got[:, 1], -keys[:, picked].transpose(0, 1))
    rows.close()


def test_when_one_layer_runs_short_of_host_memory_every_layer_drops_its_rows(monkeypatch):
    """Once the spans only the rows held are in the span store; answers stay those of a session without rows."""
    session = session_for("always")
    session.prefill(TEXT[:400])
    memories = session.cache.memories()
    assert all(memory.host_payloads is not None for memory in memories)

    def short(*args):
        raise host_payloads.HostMemoryShort("no room")

    monkeypatch.setattr(memories[0].host_payloads, "append", short)
    with pytest.warns(UserWarning, match="no longer kept"):
        session.prefill(TEXT[400:])
    assert all(memory.host_payloads is None for memory in memories)
    reference = session_for("never")
    reference.prefill(TEXT[:400])  # fed in the same pieces: the same chunks, the same spans
    reference.prefill(TEXT[400:])
    assert torch.allclose(session.prefill([5]), reference.prefill([5]), atol=1e-5)  # eager steps, same answer
    for memory, kept in zip(memories, reference.cache.memories(), strict=True):  # nothing only the rows held is lost
        assert memory.n_in_store == memory.n_spans == kept.n_spans
        shapes = [(2, 2, int(length), 16) for length in kept.span_lengths]
        ids = list(range(kept.n_spans))
        stored = memory.store.read_spans(memory.layer, ids, shapes, torch.float32, "cpu")
        assert all(map(torch.equal, stored, kept.store.read_spans(kept.layer, ids, shapes, torch.float32, "cpu")))


def test_the_window_is_packed_from_a_buffer_sized_to_it_not_to_the_prefill_chunks():
    session = session_for("always")
    session.prefill(TEXT)
    window = session.cache.memories()[0].window
    before = (window.keys().clone(), window.positions().clone())
    session.prefill([5])
    assert window.capacity <= window.length + 256
    assert torch.equal(window.keys()[:, :, :-1], before[0]) and torch.equal(window.positions()[:-1], before[1])


def test_a_reopened_store_fills_its_host_rows_and_decodes_as_the_saved_session(tmp_path):
    saved = session_for("always")
    saved.reset(store=tmp_path / "store")
    saved.prefill(TEXT)
    saved.save()
    expected = torch.stack([saved.prefill([token]) for token in (5, 9, 12)])
    config = saved.config
    saved.close()
    reopened = Session.open(tmp_path / "store", model=tiny_llama(n_layers=3), tokenizer=byte_tokenizer(), config=config)
    for memory in reopened.cache.memories():
        assert memory.host_payloads is not None and memory.host_payloads.length == memory.tables.n_rows
        assert memory.captured_ready()
    got = torch.stack([reopened.prefill([token]) for token in (5, 9, 12)])
    assert reopened._captured.steps["declined"] == 0 and reopened._captured.layers is not None
    assert (got - expected).abs().max().item() < 1e-5


def test_the_bundled_model_answers_the_same_through_captured_steps(smollm):
    """The real model (30 layers, 3 KV heads) over a generated text with a fact: the same greedy answer, token
    for token, whether its decode steps run eagerly or captured."""
    model, tokenizer = smollm
    fact = "The secret password for the harbour gate is 'blue heron'."
    text = text_with_fact(fact, n_sentences=120, depth=0.4, seed=5)
    answers = []
    for where in ("never", "always"):
        config = LtriConfig(memory=MemoryConfig(host_payloads=where), retrieval=RetrievalConfig(backend="torch"))
        session = Session(model, config, tokenizer=tokenizer)
        session.feed(text)
        assert session.stats().spans > 0
        session.ask("What is the secret password for the harbour gate?", max_new_tokens=16)
        answers.append(session.last_answer_tokens)
        if where == "always":
            steps = session._captured.steps
            assert steps["declined"] == 0 and steps["bound"] + steps["eager"] == len(session.last_answer_tokens)
    assert answers[0] == answers[1] and len(answers[0]) > 3


@pytest.mark.parametrize("n_tokens", [1200, 3000, 3300])
def test_evictions_while_decoding_keep_the_first_binding(n_tokens):
    """Spans leave the window while decoding. The first step reserves room for them in the span tables and the
    index, and the budget's candidates are rounded up, so no buffer grows and no shape changes: one binding (one
    eager step), then the same step. Without either, these texts bind twice (1200: the index had room for one
    more vector; 3000: the tables had room for the window's tokens but not for the ones decoded next; 3300: a
    shorter span was stored)."""
    session = session_for("always")
    session.prefill(torch.randint(0, 256, (n_tokens,), generator=torch.Generator().manual_seed(3)).tolist())
    spans_before = [memory.n_spans for memory in session.cache.memories()]
    decode_steps, token = 60, 65
    for _ in range(decode_steps):
        token = int(session.prefill([token])[-1].argmax())
    steps = session._captured.steps
    assert all(memory.n_spans > before for memory, before in zip(session.cache.memories(), spans_before, strict=True))
    assert steps["declined"] == 0 and steps["bound"] == 1 and steps["eager"] == decode_steps - 1


def test_a_rebind_says_what_changed():
    session = session_for("always")
    session.prefill(TEXT)
    token = 65
    for step in range(5):
        if step == 3:  # the span tables grow: new tensors, which the bound step does not read
            tables = session.cache.memories()[1].tables
            tables.reserve(tables.n_spans + 10_000, tables.n_rows + 10_000)
        token = int(session.prefill([token])[-1].argmax())
    captured = session._captured
    assert captured.steps["bound"] == 2
    assert {"span lengths", "span first rows", "row owners"} <= set(captured.rebinds)
    assert captured.rebinds["span lengths"] == 1 and "window keys" not in captured.rebinds


def test_the_row_caches_hits_count_every_binding_s_steps():
    """CapturedDecode.cache_hits: each binding makes empty row caches; the steps before a rebind keep their hits."""
    session = session_for("always", **SPARQ)
    session.prefill(TEXT)
    token, captured = 65, None
    for step in range(6):
        if step == 3:  # the span tables grow: the next step binds anew, with new caches
            first_binding = {kind: captured.cache_hits(kind) for kind in CACHE_KINDS}
            tables = session.cache.memories()[1].tables
            tables.reserve(tables.n_spans + 10_000, tables.n_rows + 10_000)
        token = int(session.prefill([token])[-1].argmax())
        captured = session._captured
    assert captured.steps["bound"] == 2
    for kind, (found_before, read_before) in first_binding.items():
        bound_now = torch.stack([getattr(layer, kind).hits for layer in captured.layers]).sum(0)
        found, read = captured.cache_hits(kind)
        assert 0 < found_before <= read_before and bound_now[1] > 0
        assert [found, read] == [found_before + bound_now[0], read_before + bound_now[1]]
    uncached = session_for("always", row_cache=False)
    decode(uncached, 2)
    assert uncached._captured.cache_hits() is None and uncached._captured.cache_hits("candidate_cache") is None


def test_a_binding_leaves_room_for_the_steps_that_follow(monkeypatch):
    """The worst case a prefill can leave: room in the stored spans' tables and index just enough for the window's
    tokens when the step binds (buffers grown by exactly what is needed). The window then grows by a token, the
    room is short, and without slack the step was bound again at once. The binding reserves BIND_SLACK tokens
    more, so in hundreds of steps no buffer of the stored spans grows."""
    exact = lambda capacity, needed, minimum=0: max(needed, minimum)  # noqa: E731
    for module in ("ltri.growth", "ltri.span_tables", "ltri.index.torch_index"):
        monkeypatch.setattr(f"{module}.grown_capacity", exact)
    session = session_for("always")
    session.prefill(TEXT)
    for memory in session.cache.memories():
        leaving = memory.window.length + 2 * WINDOW_HEADROOM
        memory.tables.reserve(memory.tables.n_spans + leaving, memory.tables.n_rows + leaving)
        memory.index.reserve(
            memory.index.n_spans + leaving, memory.index.n_vectors + leaving * memory.span_config.max_vectors
        )
    token = 65
    for _ in range(300):
        token = int(session.prefill([token])[-1].argmax())
    grown = {"span lengths", "span first rows", "row owners", "index vectors", "index slot firsts", "persistence"}
    assert session._captured.steps["declined"] == 0 and not grown & set(session._captured.rebinds)


def answer_steps(session: Session, n_steps: int) -> tuple[torch.Tensor, list]:
    """Logits and retrieved spans of n_steps greedy steps after a question whose reread left evidence."""
    session.prefill(TEXT)
    session.ask("What came before?", max_new_tokens=1)
    assert all(memory.evidence.length > 0 for memory in session.cache.memories())
    logits, steps, retrieved = session.forward_token(65), [], []
    for _ in range(n_steps):
        logits = session.forward_token(int(logits.argmax()))
        steps.append(logits)
        retrieved.append([memory.last_retrieved.tolist() for memory in session.cache.memories()])
    return torch.stack(steps), retrieved


@pytest.mark.parametrize("echo_tokens, selection", [(0, {}), (24, {}), (24, SPARQ)])
def test_answers_with_evidence_take_captured_steps_equal_to_eager_steps(echo_tokens, selection):
    """A question's reread leaves evidence resident for its answer (ltri.evidence): the captured step packs it
    between the retrieved tokens and the window and leaves the rows it holds out of what it retrieves, as the eager
    step does (and a selector chooses among the rest)."""
    options = {"reread": True, "reread_evidence": 40, "echo_tokens": echo_tokens, **selection}
    eager = session_for("never", **options)
    captured = session_for("always", **options)
    expected, expected_spans = answer_steps(eager, 20)
    got, got_spans = answer_steps(captured, 20)
    steps = captured._captured.steps
    assert steps["declined"] == 0 and steps["bound"] + steps["eager"] == 22  # the answer's first step is captured too
    assert got_spans == expected_spans
    assert (got - expected).abs().max().item() < 1e-4
    captured.ask("And then?", max_new_tokens=3)  # other evidence: the bound step is stale
    assert captured._captured.rebinds["evidence"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_answers_with_evidence_replay_the_graph_on_the_gpu():
    options = {"reread": True, "reread_evidence": 40, "echo_tokens": 24}
    eager = session_for("never", "cuda", torch.bfloat16, **options)
    captured = session_for("cuda", "cuda", torch.bfloat16, **options)
    expected, expected_spans = answer_steps(eager, 20)
    got, got_spans = answer_steps(captured, 20)
    assert captured._captured.steps["replayed"] >= 18 and captured._captured.graph is not None
    agreeing = sum(a == b for a, b in zip(got_spans, expected_spans, strict=True))
    assert agreeing >= 17  # bf16: a near tie may go the other way now and then
    assert (got - expected).abs().max().item() < 0.1


def test_rows_the_evidence_holds_are_left_out_in_order():
    evidence = Evidence()
    positions = torch.tensor([2, 9, 10, 14])  # text positions; with 4 sinks, position 2 is a sink, not a row
    evidence.keep(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), positions)
    held = evidence.held_rows(n_sink=4, n_rows=12)
    assert held.nonzero().flatten().tolist() == [5, 6, 10]
    rows, count = torch.tensor([3, 5, 6, 7, 10, 11, 0, 0]), torch.tensor(6)
    kept, kept_count = rows_not_held(rows, count, held)
    assert int(kept_count) == 3 and kept.tolist() == [3, 7, 11, 0, 0, 0, 0, 0]
