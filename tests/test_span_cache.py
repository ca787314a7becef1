"""The per-layer span cache: LRU order, byte budget, hit and miss counts, oversized requests."""

from __future__ import annotations

import pytest
import torch

from ltri.offload import SpanCache, SpanStore

LAYER = 3
SHAPE = (2, 2, 8, 4)  # (2, nheads_kv, span_len, headdim)
SPAN_BYTES = 2 * 2 * 8 * 4 * 4  # float32


def payload(span_id: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(span_id))


class CountingStore(SpanStore):
    """A real store that counts its read_spans calls."""

    reads: list[list[int]]

    def read_spans(self, layer, span_ids, shapes, dtype, device):
        self.reads.append(list(span_ids))
        return super().read_spans(layer, span_ids, shapes, dtype, device)


@pytest.fixture
def store(tmp_path):
    with CountingStore(tmp_path / "store") as opened:
        opened.reads = []
        opened.put_spans(LAYER, range(20), [payload(span_id) for span_id in range(20)])
        yield opened


def get(cache: SpanCache, span_ids) -> list[torch.Tensor]:
    return cache.get(span_ids, [SHAPE] * len(span_ids), torch.float32)


def cached(cache: SpanCache) -> set[int]:
    return {span_id for span_id in range(100) if span_id in cache}


def test_payloads_come_back_in_the_order_asked(store):
    cache = SpanCache(store, LAYER, byte_budget=10 * SPAN_BYTES, device="cpu")
    get(cache, [4, 1])
    result = get(cache, [3, 1, 4, 3])
    assert all(torch.equal(got, payload(span_id)) for got, span_id in zip(result, [3, 1, 4, 3], strict=True))
    assert store.reads == [[4, 1], [3]]  # one store read per request, for its misses only
    assert (cache.hits, cache.misses) == (2, 3)


def test_least_recently_used_span_is_evicted_first(store):
    cache = SpanCache(store, LAYER, byte_budget=3 * SPAN_BYTES, device="cpu")
    get(cache, [0, 1, 2])
    get(cache, [0])  # 1 is now the least recently used
    get(cache, [3])
    assert cached(cache) == {0, 2, 3} and cache.nbytes() == 3 * SPAN_BYTES
    get(cache, [5, 6])
    assert cached(cache) == {3, 5, 6}
    assert (cache.hits, cache.misses) == (1, 6)


def test_budget_is_respected_across_many_requests(store):
    cache = SpanCache(store, LAYER, byte_budget=5 * SPAN_BYTES + 7, device="cpu")
    generator = torch.Generator().manual_seed(0)
    n_asked = 0
    for _ in range(50):
        request = torch.randint(0, 20, (3,), generator=generator).tolist()
        n_asked += len(set(request))
        get(cache, request)
        assert cache.nbytes() <= cache.byte_budget and len(cache) <= 5
        assert all(span_id in cache for span_id in request)
    assert cache.hits + cache.misses == n_asked and cache.hits > 0
    assert cache.misses == sum(len(read) for read in store.reads)


def test_request_bigger_than_budget_is_served_and_shrunk_later(store):
    cache = SpanCache(store, LAYER, byte_budget=2 * SPAN_BYTES, device="cpu")
    get(cache, [0])
    result = get(cache, [4, 5, 6, 7, 8])
    assert all(torch.equal(got, payload(span_id)) for got, span_id in zip(result, [4, 5, 6, 7, 8], strict=True))
    assert cached(cache) == {4, 5, 6, 7, 8}  # over budget until the next call
    get(cache, [9])
    assert cached(cache) == {8, 9} and cache.nbytes() == 2 * SPAN_BYTES


def test_zero_budget_still_serves(store):
    cache = SpanCache(store, LAYER, byte_budget=0, device="cpu")
    assert torch.equal(get(cache, [2])[0], payload(2))
    assert torch.equal(get(cache, [3])[0], payload(3))
    assert cached(cache) == {3}


def test_put_block_spares_store_reads_and_keeps_the_views_as_they_are(store):
    cache = SpanCache(store, LAYER, byte_budget=4 * SPAN_BYTES, device="cpu")
    block = torch.randn(2, 2, 16, 4)  # spans 77 and 78 (not in the store: a read would fail), 8 tokens each
    cache.put_block([77, 78], [block[:, :, :8], block[:, :, 8:]])
    got = get(cache, [78, 77])
    assert torch.equal(got[0], block[:, :, 8:]) and torch.equal(got[1], block[:, :, :8])
    assert store.reads == [] and cache.hits == 2 and cache.nbytes() == 2 * SPAN_BYTES
    assert got[0].untyped_storage().data_ptr() == block.untyped_storage().data_ptr()  # views, no copies
    cache.put_block([77], [payload(1)])
    assert torch.equal(get(cache, [77])[0], payload(1)) and cache.nbytes() == 2 * SPAN_BYTES


def test_clear_and_shape_mismatch(store):
    cache = SpanCache(store, LAYER, byte_budget=4 * SPAN_BYTES, device="cpu")
    get(cache, [1, 2])
    with pytest.raises(ValueError, match="cached as"):
        cache.get([1], [(2, 2, 4, 8)], torch.float32)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes() == 0
    get(cache, [1])
    assert store.reads[-1] == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_cache(store):
    cache = SpanCache(store, LAYER, byte_budget=3 * SPAN_BYTES, device="cuda")
    result = get(cache, [1, 2, 3, 4])
    assert all(
        got.is_cuda and torch.equal(got.cpu(), payload(span_id))
        for got, span_id in zip(result, [1, 2, 3, 4], strict=True)
    )
