"""Cutting every layer's chunk together at the end of the forward changes nothing the layers compute."""

import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.deferred_segmentation import DeferredSegmentation


def read(config: LtriConfig, ids: list[int], deferred: bool, batched: bool | None = None):
    model = tiny_llama(n_layers=3, seed=6)
    with Session(model, config, tokenizer=byte_tokenizer()) as session:
        memories = session.cache.memories()
        for memory in memories:
            if deferred:
                memory.deferred.batched = batched
            else:
                memory.deferred = None
        logits = session.prefill(ids, all_logits=True)
        decoded = torch.stack([session.prefill([token]) for token in ids[:20]])
        lengths = [memory.span_lengths.clone() for memory in memories]
        pending = [memory.pending.lengths.clone() for memory in memories]
    return logits, decoded, lengths, pending


@pytest.mark.parametrize("index_vectors", ["keys", "bounds"])
@pytest.mark.parametrize("chunk_size", [40, 100])
@pytest.mark.parametrize("batched", [True, None])
def test_deferred_cut_gives_the_same_spans_and_logits(index_vectors, chunk_size, batched):
    """batched True: one batched segmentation of the three layers (the GPU's way, here on the CPU)."""
    config = LtriConfig(
        memory=MemoryConfig(n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24, index_vectors=index_vectors),
        retrieval=RetrievalConfig(budget=64, search_k=8),
        chunk_size=chunk_size,
    )
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(4)).tolist()
    deferred = read(config, ids, deferred=True, batched=batched)
    at_once = read(config, ids, deferred=False)
    assert sum(lengths.numel() for lengths in deferred[2]) > 3 * 10, "spans must have left the window"
    for got, expected in zip(deferred[2] + deferred[3], at_once[2] + at_once[3], strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(deferred[0], at_once[0])
    assert torch.equal(deferred[1], at_once[1])


def test_blocks_wait_until_flushed_and_come_back_in_order():
    cuts = []
    deferred = DeferredSegmentation()
    spans = SpanConfig(min_len=4, max_len=24)
    blocks = [torch.tril(torch.rand(n, n, generator=torch.Generator().manual_seed(n))) for n in (30, 50, 30)]
    blocks = [block / block.sum(1, keepdim=True) for block in blocks]
    for number, block in enumerate(blocks):
        deferred.add(block, spans, lambda cut, _, number=number: cuts.append((number, int(cut.lengths.sum()))))
    assert cuts == []
    deferred.flush()
    assert cuts == [(0, 30), (1, 50), (2, 30)]
    assert deferred.waiting == []


def test_too_many_waiting_bytes_cut_at_once():
    cuts = []
    deferred = DeferredSegmentation(max_waiting_bytes=30 * 30 * 4)
    block = torch.tril(torch.ones(30, 30)) / torch.arange(1, 31)[:, None]
    deferred.add(block, SpanConfig(min_len=4, max_len=24), lambda cut, _: cuts.append(cut))
    assert cuts == []
    deferred.add(block, SpanConfig(min_len=4, max_len=24), lambda cut, _: cuts.append(cut))
    assert len(cuts) == 2
