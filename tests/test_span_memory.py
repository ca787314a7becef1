"""The ltri policy: spans leave the window for the store and come back by retrieval.

The anchor: with a budget that retrieves every span (and no token selection), ltri computes exactly
the model's full attention in ``true`` position mode, through segmentation, LMDB and the index.
"""

import pytest
import torch
from support import DEVICES, byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig

SMALL_SPANS = SpanConfig(min_len=4, max_len=24)


def ltri_config(
    position_mode="true",
    budget=10**6,
    search_k=10**6,
    index_vectors="keys",
    backend="auto",
    segmentation="triangles",
    **kw,
):
    return LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24, index_vectors=index_vectors, segmentation=segmentation),
        retrieval=RetrievalConfig(budget=budget, search_k=search_k, backend=backend),
        position_mode=position_mode,
        **kw,
    )


def full_logits(model, ids, chunk_size):
    config = LtriConfig(memory=MemoryConfig(policy="full"), chunk_size=chunk_size, position_mode="true")
    return Session(model, config, tokenizer=byte_tokenizer()).prefill(ids, all_logits=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_vectors", ["keys", "bounds"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk_size", [1, 33, 100])
def test_retrieving_everything_reproduces_full_attention(device, index_vectors, backend, chunk_size):
    model = tiny_llama(seed=2).to(device)
    ids = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = full_logits(model, ids, chunk_size)
    config = ltri_config(index_vectors=index_vectors, backend=backend, chunk_size=chunk_size)
    with Session(model, config, tokenizer=byte_tokenizer()) as session:
        got = session.prefill(ids, all_logits=True)
        stats = session.stats()
    assert stats.spans > 3 * 10, "the text must have left the window as spans in every layer"
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("index_vectors", ["keys", "bounds"])
def test_fixed_blocks_are_exact_and_of_the_block_length(index_vectors):
    """InfLLM's blocks and Quest's pages: the same memory with fixed-length spans."""
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = full_logits(model, ids, 48)
    config = ltri_config(index_vectors=index_vectors, segmentation="fixed", chunk_size=48)
    with Session(model, config, tokenizer=byte_tokenizer()) as session:
        got = session.prefill(ids, all_logits=True)
        lengths = torch.cat([memory.span_lengths for memory in session.cache.memories()])
    assert (got - expected).abs().max().item() < 1e-4
    assert lengths.numel() > 3 * 10 and lengths.max().item() == 24
    assert (lengths == 24).float().mean().item() >= 0.5, "blocks are cut at the block length (a chunk's tail aside)"


def test_decode_steps_after_prefill_reproduce_full_attention():
    model = tiny_llama(n_heads=6, n_kv_heads=2, seed=4)
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(5))
    expected = full_logits(model, ids.tolist(), 64)
    with Session(model, ltri_config(chunk_size=64), tokenizer=byte_tokenizer()) as session:
        prefill = session.prefill(ids[:300].tolist(), all_logits=True)
        decoded = torch.stack([session.prefill([int(t)]) for t in ids[300:]])
    assert (torch.cat([prefill, decoded]) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("position_mode", ["compact", "one_angle", "true"])
def test_resident_set_stays_bounded_by_sinks_budget_window_and_chunk(position_mode):
    budget, chunk = 48, 32
    model = tiny_llama(seed=1)
    config = ltri_config(position_mode=position_mode, budget=budget, search_k=8, chunk_size=chunk)
    with Session(model, config, tokenizer=byte_tokenizer()) as session:
        seen = []
        session.prefill(
            torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(9)).tolist(),
            progress=lambda done, total: seen.append(session.stats()),
        )
        final = session.stats()
    assert final.spans > 0
    window_bound = 64 + 24 + chunk  # window + one span still waiting + a chunk's tokens before eviction
    assert max(s.resident_tokens for s in seen) <= 8 + budget + window_bound
    assert final.store_bytes > 0


@pytest.mark.parametrize(("refresh_every", "searches"), [(1, 10), (4, 2), (0, 0)])
def test_decode_steps_retrieve_every_refresh_every_steps(refresh_every, searches):
    """Between refreshes a decode step attends to the spans the last retrieval loaded, without searching."""
    model = tiny_llama(seed=1)
    config = LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SMALL_SPANS,
        retrieval=RetrievalConfig(budget=48, search_k=8, refresh_every=refresh_every),
        chunk_size=32,
        position_mode="compact",
    )
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(2)).tolist()
    with Session(model, config, tokenizer=byte_tokenizer()) as session:
        session.prefill(ids[:560])
        memories = session.cache.memories()
        calls = [0] * len(memories)
        for layer, memory in enumerate(memories):
            search = memory.index.search

            def counted(*args, layer=layer, search=search):
                calls[layer] += 1
                return search(*args)

            memory.index.search = counted
        after_question = [memory.last_retrieved.clone() for memory in memories]
        for token in ids[560:570]:
            session.prefill([token])
    assert calls == [searches] * len(memories)
    if refresh_every == 0:
        assert all(torch.equal(m.last_retrieved, r) for m, r in zip(memories, after_question, strict=True))


def test_span_payloads_are_the_spans_keys_and_values_in_one_block():
    from ltri.span_memory import span_payloads

    keys, values = torch.randn(3, 40, 8), torch.randn(3, 40, 8)
    lengths = torch.tensor([5, 1, 20, 14])
    pieces = span_payloads(keys, values, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    for piece, start, length in zip(pieces, starts.tolist(), lengths.tolist(), strict=True):
        assert piece.is_contiguous() and piece.shape == (2, 3, length, 8)
        assert torch.equal(piece, torch.stack([keys[:, start : start + length], values[:, start : start + length]]))
    assert len({piece.untyped_storage().data_ptr() for piece in pieces}) == 1, "views of one block"
