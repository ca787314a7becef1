"""Token selection at decode steps (Loki, SparQ) after span retrieval, on its own and inside a Session."""

import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, LtriError, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.token_selection import TokenSelector, fit_basis


def random_step(nheads=6, nheads_kv=2, n=300, headdim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2.0, 0.1, headdim)  # keys with decaying variance, like a model's
    keys = torch.randn(1, nheads_kv, n, headdim, generator=gen) * scales
    values = torch.randn(1, nheads_kv, n, headdim, generator=gen)
    query = torch.randn(1, nheads, 1, headdim, generator=gen)
    return query, keys, values


def exact_group_logits(query, keys):
    """(nheads_kv, group, n) pre-RoPE q.k of every query head of each KV group."""
    nheads_kv = keys.shape[1]
    q = query[0, :, 0].view(nheads_kv, -1, query.shape[-1])
    return torch.einsum("hgd,hnd->hgn", q, keys[0])


@pytest.mark.parametrize("n_tokens", [1, 40, 299])
def test_full_rank_loki_keeps_the_tokens_of_the_largest_group_scores(n_tokens):
    query, keys, values = random_step()
    selector = TokenSelector("loki", n_tokens, rank=32, basis=fit_basis([keys]))
    _, _, indices = selector.select(query, keys, values)
    expected = exact_group_logits(query, keys).sum(dim=1).topk(n_tokens).indices.sort().values
    assert torch.equal(indices, expected)


def test_full_rank_sparq_keeps_the_tokens_of_the_largest_attention_mass():
    query, keys, values = random_step(seed=1)
    _, _, indices = TokenSelector("sparq", 50, rank=32).select(query, keys, values)
    probabilities = (exact_group_logits(query, keys) / 32**0.5).softmax(dim=-1).sum(dim=1)
    assert torch.equal(indices, probabilities.topk(50).indices.sort().values)


@pytest.mark.parametrize("method", ["loki", "sparq"])
def test_selected_keys_and_values_are_the_chosen_tokens_in_document_order(method):
    query, keys, values = random_step(seed=2)
    selector = TokenSelector(method, 64, rank=8, basis=fit_basis([keys]))
    got_keys, got_values, indices = selector.select(query, keys, values)
    assert got_keys.shape == (1, 2, 64, 32) and bool((indices.diff(dim=1) > 0).all())
    for head in range(2):
        assert torch.equal(got_keys[0, head], keys[0, head, indices[head]])
        assert torch.equal(got_values[0, head], values[0, head, indices[head]])


def test_nothing_is_dropped_when_the_retrieved_tokens_fit():
    query, keys, values = random_step(n=40)
    got_keys, got_values, indices = TokenSelector("sparq", 40, rank=4).select(query, keys, values)
    assert indices is None and got_keys is keys and got_values is values


def test_low_rank_loki_is_close_to_full_rank_on_low_rank_keys():
    """Keys in an 8-dimensional subspace: 8 principal directions score them exactly."""
    gen = torch.Generator().manual_seed(3)
    mixing = torch.randn(2, 8, 32, generator=gen)
    keys = torch.einsum("hnr,hrd->hnd", torch.randn(2, 300, 8, generator=gen), mixing)[None]
    query = torch.randn(1, 6, 1, 32, generator=gen)
    basis = fit_basis([keys])
    _, _, low = TokenSelector("loki", 30, rank=8, basis=basis).select(query, keys, keys)
    _, _, full = TokenSelector("loki", 30, rank=32, basis=basis).select(query, keys, keys)
    assert torch.equal(low, full)


# ---- inside a Session -------------------------------------------------------------------------------
def config(selector="none", select_tokens=1024, budget=96):
    return LtriConfig(
        memory=MemoryConfig(n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24),
        retrieval=RetrievalConfig(budget=budget, search_k=16, selector=selector, select_tokens=select_tokens),
        chunk_size=50,
    )


def text_ids(n, seed=5):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_logits(session, ids):
    return torch.stack([session.prefill([token]) for token in ids])


@pytest.mark.parametrize("selector", ["loki", "sparq"])
def test_a_selector_that_keeps_every_retrieved_token_changes_nothing(selector):
    model, ids = tiny_llama(seed=6), text_ids(420)
    with Session(model, config(), tokenizer=byte_tokenizer()) as session:
        session.prefill(ids[:400])
        expected = decode_logits(session, ids[400:])
    with Session(model, config(selector, select_tokens=10**4), tokenizer=byte_tokenizer()) as session:
        session.prefill(ids[:400])
        got = decode_logits(session, ids[400:])
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("selector", ["loki", "sparq"])
def test_decode_steps_attend_to_the_selection_of_what_was_retrieved(selector, monkeypatch):
    from ltri.span_memory import SpanMemory

    steps = []  # per decode step and layer: (tokens retrieved, tokens attended between sinks and window)
    original = SpanMemory.resident

    def record(memory, queries):
        resident = original(memory, queries)
        if queries.shape[2] == 1 and resident is not None:
            steps.append((memory.resident_tokens() - memory.sinks.length - memory.window.length, resident.layout))
        return resident

    monkeypatch.setattr(SpanMemory, "resident", record)
    model, ids = tiny_llama(seed=7), text_ids(520, seed=8)
    with Session(model, config(selector, select_tokens=16), tokenizer=byte_tokenizer()) as session:
        session.prefill(ids[:500])
        logits = decode_logits(session, ids[500:])
    assert torch.isfinite(logits).all()
    assert max(retrieved for retrieved, _ in steps) > 16, "retrieval brought back more than the selection keeps"
    assert all(layout.n_retrieved == min(16, retrieved) for retrieved, layout in steps)


def test_the_loki_basis_is_fitted_during_prefill_and_saved_with_the_store(tmp_path):
    model, ids = tiny_llama(seed=9), text_ids(440, seed=10)
    store = tmp_path / "store"
    with Session(model, config("loki", select_tokens=16), tokenizer=byte_tokenizer(), store=store) as session:
        session.prefill(ids[:400])
        bases = [memory.basis.clone() for memory in session.cache.memories()]
        session.save()
        expected = decode_logits(session, ids[400:])
    with Session.open(store, model=model, tokenizer=byte_tokenizer()) as reopened:
        assert all(torch.equal(a, m.basis) for a, m in zip(bases, reopened.cache.memories(), strict=True))
        got = decode_logits(reopened, ids[400:])
    assert bases[0].shape == (2, 16, 16)
    assert torch.equal(got, expected)


def test_the_loki_basis_is_decomposed_when_first_asked_for_not_while_reading(monkeypatch):
    decomposed = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda matrices: decomposed.append(matrices.shape) or eigh(matrices))
    model, ids = tiny_llama(seed=9), text_ids(440, seed=10)
    with Session(model, config(), tokenizer=byte_tokenizer()) as session:
        session.prefill(ids[:400])
        assert decomposed == []  # the prefill kept the keys' covariance only
        memories = session.cache.memories()
        bases = [memory.basis for memory in memories]
        assert decomposed == [(2, 16, 16)] * len(memories)
        assert all(memory.basis is basis for memory, basis in zip(memories, bases, strict=True))  # once a layer
        assert len(decomposed) == len(memories)
    for basis in bases:  # orthonormal columns, each column's largest entry positive (pca_basis)
        torch.testing.assert_close(basis.mT @ basis, torch.eye(16).expand(2, 16, 16), atol=1e-5, rtol=0)
        peak = basis.abs().argmax(dim=1, keepdim=True)
        assert (basis.gather(1, peak) > 0).all()


def test_a_selector_needs_positions_that_do_not_depend_on_the_kept_tokens():
    with pytest.raises(LtriError, match="compact or one_angle"):
        LtriConfig(retrieval=RetrievalConfig(selector="sparq"), position_mode="true")
