"""Span indexes: both backends against a brute-force reference, padding, state, the Quest bound."""

from __future__ import annotations

import faiss
import pytest
import torch

from ltri.errors import LtriError
from ltri.index import (
    FaissSpanIndex,
    TorchSpanIndex,
    index_class,
    index_from_state,
    make_index,
)
from ltri.span_vectors import bound_query, key_bounds
from ltri.spans import Segmentation

BACKENDS = ["torch", "faiss"]
NHEADS_KV, DIM = 3, 16


def reference_search(vectors, span_ids, queries, k):
    """Per head and query: every span's max score, best k spans, by plain Python."""
    scores = torch.matmul(queries.double(), vectors.double().transpose(1, 2))  # (nheads_kv, n_queries, n_vectors)
    nheads_kv, n_queries, _ = scores.shape
    top_scores = torch.full((nheads_kv, n_queries, k), float("-inf"), dtype=torch.float64)
    top_ids = torch.full((nheads_kv, n_queries, k), -1, dtype=torch.long)
    for head in range(nheads_kv):
        for query in range(n_queries):
            best = {}
            for score, span_id in zip(scores[head, query].tolist(), span_ids.tolist(), strict=True):
                best[span_id] = max(best.get(span_id, float("-inf")), score)
            ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
            for place, (span_id, score) in enumerate(ranked):
                top_ids[head, query, place], top_scores[head, query, place] = span_id, score
    return top_scores, top_ids


def random_batches(seed: int, sizes=(7, 30, 90), n_spans_per_batch=(3, 12, 40)):
    """Batches of (vectors, span_ids): ids repeat inside a batch, and the last span of a batch continues
    in the next one; ids are sparse (multiples of 5 plus an offset)."""
    generator = torch.Generator().manual_seed(seed)
    batches, first_span = [], 0
    for size, n_spans in zip(sizes, n_spans_per_batch, strict=True):
        local = torch.randint(0, n_spans, (size,), generator=generator)
        local[:n_spans] = torch.arange(n_spans)  # every span of the batch has a vector
        span_ids = (first_span + local) * 5 + 3
        vectors = torch.randn(NHEADS_KV, size, DIM, generator=generator)
        batches.append((vectors, span_ids))
        first_span += n_spans - 1
    return batches


def filled_index(backend: str, batches) -> object:
    index = make_index(backend, NHEADS_KV, DIM, "cpu")
    for vectors, span_ids in batches:
        index.add(vectors, span_ids)
    return index


def all_of(batches):
    return torch.cat([vectors for vectors, _ in batches], dim=1), torch.cat([ids for _, ids in batches])


def assert_searches_as_reference(index, batches, n_queries: int, k: int, seed: int):
    """index.search of n_queries random queries gives the brute-force reference's spans and scores; returns them."""
    queries = torch.randn(NHEADS_KV, n_queries, DIM, generator=torch.Generator().manual_seed(seed))
    scores, ids = index.search(queries.to(index.device), k)
    expected_scores, expected_ids = reference_search(*all_of(batches), queries, k)
    assert torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(scores.double().cpu(), expected_scores, atol=1e-4, rtol=0)
    return queries, scores, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 17])
def test_search_matches_reference_after_incremental_adds(backend, k):
    batches = random_batches(seed=k)
    index = filled_index(backend, batches)
    vectors, span_ids = all_of(batches)
    queries = torch.randn(NHEADS_KV, 4, DIM, generator=torch.Generator().manual_seed(1))
    scores, ids = index.search(queries, k)
    expected_scores, expected_ids = reference_search(vectors, span_ids, queries, k)
    assert scores.shape == ids.shape == (NHEADS_KV, 4, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores.double(), expected_scores, atol=1e-4, rtol=0)
    assert index.n_spans == len(set(span_ids.tolist())) and index.n_vectors == span_ids.numel()


def test_backends_agree():
    batches = random_batches(seed=7)
    queries = torch.randn(NHEADS_KV, 9, DIM, generator=torch.Generator().manual_seed(2))
    (torch_scores, torch_ids), (faiss_scores, faiss_ids) = (
        filled_index(backend, batches).search(queries, 10) for backend in BACKENDS
    )
    assert torch.equal(torch_ids, faiss_ids)
    torch.testing.assert_close(torch_scores, faiss_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_span_with_many_vectors_still_yields_k_distinct_spans(backend):
    """One span whose 60 vectors all outscore the rest must not crowd the other spans out of the top k."""
    vectors = torch.randn(NHEADS_KV, 64, DIM) * 0.01
    vectors[:, :60] += 10.0
    span_ids = torch.tensor([0] * 60 + [1, 2, 3, 4])
    index = make_index(backend, NHEADS_KV, DIM, "cpu")
    index.add(vectors, span_ids)
    _, ids = index.search(torch.ones(NHEADS_KV, 1, DIM), 3)
    assert ids[:, 0, 0].eq(0).all()
    assert (ids >= 0).all() and all(len(set(row.tolist())) == 3 for row in ids.view(-1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_beyond_n_spans_pads_with_minus_one_and_minus_inf(backend):
    index = make_index(backend, NHEADS_KV, DIM, "cpu")
    index.add(torch.randn(NHEADS_KV, 5, DIM), torch.tensor([4, 9, 4, 2, 9]))
    scores, ids = index.search(torch.randn(NHEADS_KV, 2, DIM), 6)
    assert ids[..., :3].ge(0).all() and ids[..., 3:].eq(-1).all()
    assert torch.isfinite(scores[..., :3]).all() and scores[..., 3:].eq(float("-inf")).all()
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    assert sorted(ids[0, 0, :3].tolist()) == [2, 4, 9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_index_returns_only_padding(backend):
    index = make_index(backend, NHEADS_KV, DIM, "cpu")
    scores, ids = index.search(torch.randn(NHEADS_KV, 2, DIM), 4)
    assert ids.eq(-1).all() and scores.eq(float("-inf")).all() and ids.shape == (NHEADS_KV, 2, 4)
    assert index.n_spans == index.n_vectors == 0


@pytest.mark.parametrize("source", BACKENDS)
@pytest.mark.parametrize("target", BACKENDS)
def test_state_round_trip(source, target):
    batches = random_batches(seed=3)
    index = filled_index(source, batches)
    state = index.state()
    assert all(tensor.device.type == "cpu" for tensor in state.values())
    rebuilt = index_from_state(target, state, "cpu")
    assert type(rebuilt) is index_class(target, "cpu")
    queries = torch.randn(NHEADS_KV, 3, DIM)
    scores, ids = index.search(queries, 8)
    rebuilt_scores, rebuilt_ids = rebuilt.search(queries, 8)
    assert torch.equal(ids, rebuilt_ids)
    torch.testing.assert_close(scores, rebuilt_scores, atol=1e-4, rtol=0)
    assert (rebuilt.n_spans, rebuilt.n_vectors) == (index.n_spans, index.n_vectors)
    extra = torch.randn(NHEADS_KV, 2, DIM) * 100
    for grown in (index, rebuilt):  # both keep growing the same way after the round trip
        grown.add(extra, torch.tensor([1000, 1000]))
    assert torch.equal(index.search(queries, 8)[1], rebuilt.search(queries, 8)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_empty_index_round_trips(backend):
    rebuilt = index_class(backend, "cpu").from_state(make_index(backend, NHEADS_KV, DIM, "cpu").state(), "cpu")
    assert (rebuilt.nheads_kv, rebuilt.dim, rebuilt.n_vectors) == (NHEADS_KV, DIM, 0)


def test_damaged_state_is_refused():
    state = make_index("torch", NHEADS_KV, DIM, "cpu").state()
    with pytest.raises(LtriError, match="damaged"):
        TorchSpanIndex.from_state({"vectors": state["vectors"]}, "cpu")
    with pytest.raises(LtriError, match="damaged"):
        FaissSpanIndex.from_state({"vectors": torch.zeros(2, 3, 4), "span_ids": torch.zeros(2)}, "cpu")


def test_make_index_backends():
    assert isinstance(make_index("auto", 2, 8, "cpu"), FaissSpanIndex)
    assert isinstance(make_index("torch", 2, 8, "cpu"), TorchSpanIndex)
    assert index_class("auto", "cuda") is TorchSpanIndex
    with pytest.raises(LtriError, match="Unknown index backend"):
        make_index("annoy", 2, 8, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_are_rejected(backend):
    index = make_index(backend, NHEADS_KV, DIM, "cpu")
    with pytest.raises(ValueError):
        index.add(torch.randn(NHEADS_KV, 3, DIM + 1), torch.arange(3))
    with pytest.raises(ValueError):
        index.add(torch.randn(NHEADS_KV, 3, DIM), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError):
        index.search(torch.randn(NHEADS_KV + 1, 1, DIM), 2)


def quest_bound_vectors(keys: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The span memory's Quest vectors for spans [starts, ends) that tile keys (nheads_kv, seqlen, headdim)."""
    zeros = torch.zeros(starts.numel())
    return key_bounds(keys, Segmentation(starts, ends, zeros, zeros.bool()))


def random_spans(seqlen: int, n_spans: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cuts = torch.randperm(seqlen - 1, generator=generator)[: n_spans - 1].add(1).sort().values
    starts = torch.cat([torch.tensor([0]), cuts])
    ends = torch.cat([cuts, torch.tensor([seqlen])])
    return starts, ends


@pytest.mark.parametrize("backend", BACKENDS)
def test_quest_bound_never_underestimates_a_span(backend):
    generator = torch.Generator().manual_seed(11)
    nheads_kv, seqlen, headdim, n_spans = 2, 300, 16, 40
    keys = torch.randn(nheads_kv, seqlen, headdim, generator=generator)
    starts, ends = random_spans(seqlen, n_spans, generator)
    index = make_index(backend, nheads_kv, 2 * headdim, "cpu")
    index.add(quest_bound_vectors(keys, starts, ends), torch.arange(n_spans))
    queries = torch.randn(nheads_kv, 6, headdim, generator=generator)
    bound_scores, bound_ids = index.search(bound_query(queries), n_spans)
    true_scores = torch.matmul(queries, keys.transpose(1, 2))  # (nheads_kv, n_queries, seqlen)
    span_of_token = torch.repeat_interleave(torch.arange(n_spans), ends - starts)
    true_max = true_scores.new_full((nheads_kv, 6, n_spans), float("-inf"))
    true_max.scatter_reduce_(2, span_of_token.expand_as(true_scores), true_scores, "amax")
    assert (bound_ids >= 0).all()
    assert (bound_scores >= true_max.gather(2, bound_ids) - 1e-4).all()


def test_quest_bound_is_the_elementwise_max_and_tight_for_single_keys():
    generator = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 10, 8, generator=generator)
    starts, ends = torch.tensor([0, 3, 4]), torch.tensor([3, 4, 10])
    bounds = quest_bound_vectors(keys, starts, ends)  # (2, 3, 16)
    assert bounds.shape == (2, 3, 16)
    torch.testing.assert_close(bounds[:, 2, :8], keys[:, 4:10].amax(dim=1))
    torch.testing.assert_close(bounds[:, 2, 8:], keys[:, 4:10].amin(dim=1))
    query = torch.randn(2, 1, 8, generator=generator)
    single = torch.matmul(bound_query(query), bounds[:, 1:2].transpose(1, 2))
    torch.testing.assert_close(single, torch.matmul(query, keys[:, 3:4].transpose(1, 2)))
    with pytest.raises(ValueError):  # spans that do not cover the keys
        quest_bound_vectors(keys, torch.tensor([0]), torch.tensor([5]))


@pytest.mark.skipif(faiss.get_num_gpus() == 0 or not torch.cuda.is_available(), reason="FAISS sees no GPU")
def test_faiss_gpu_matches_torch_on_cuda():
    batches = [(vectors.cuda(), span_ids.cuda()) for vectors, span_ids in random_batches(seed=9)]
    gpu_faiss, gpu_torch = FaissSpanIndex(NHEADS_KV, DIM, "cuda"), TorchSpanIndex(NHEADS_KV, DIM, "cuda")
    assert gpu_faiss.on_gpu
    for vectors, span_ids in batches:
        gpu_faiss.add(vectors, span_ids)
        gpu_torch.add(vectors, span_ids)
    queries = torch.randn(NHEADS_KV, 5, DIM, device="cuda")
    (faiss_scores, faiss_ids), (torch_scores, torch_ids) = gpu_faiss.search(queries, 6), gpu_torch.search(queries, 6)
    assert faiss_ids.device.type == torch_ids.device.type == "cuda"
    assert torch.equal(faiss_ids, torch_ids)
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-4, rtol=0)
    assert torch.equal(FaissSpanIndex.from_state(gpu_faiss.state(), "cuda").search(queries, 6)[1], faiss_ids)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vectors_search_as_float32_does(device, dtype):
    """Vectors and queries that the dtype holds exactly (a bf16 model's keys and queries): the index kept in that
    dtype returns float32 scores equal to a float32 index's (up to summation order) and the same spans, and its
    state is float32 as every backend's."""
    batches = [(vectors.to(dtype), span_ids) for vectors, span_ids in random_batches(seed=8)]
    queries = torch.randn(NHEADS_KV, 5, DIM, generator=torch.Generator().manual_seed(9)).to(dtype)
    low = make_index("torch", NHEADS_KV, DIM, device, dtype)
    exact = make_index("torch", NHEADS_KV, DIM, device)
    for vectors, span_ids in batches:
        low.add(vectors.to(device), span_ids.to(device))
        exact.add(vectors.to(device), span_ids.to(device))
    assert low._vectors.dtype == dtype
    assert low.vector_nbytes() * 2 == exact.vector_nbytes() == exact.n_vectors * NHEADS_KV * DIM * 4
    low_scores, low_ids = low.search(queries.to(device), 6)
    exact_scores, exact_ids = exact.search(queries.float().to(device), 6)
    assert low_scores.dtype == torch.float32
    torch.testing.assert_close(low_scores, exact_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(low_ids, exact_ids)
    assert low.state()["vectors"].dtype == torch.float32
    rebuilt = index_from_state("torch", low.state(), device, dtype)
    assert torch.equal(rebuilt.search(queries.to(device), 6)[1], low_ids)


def test_vector_dtype_is_the_models_on_cuda_only():
    from ltri.index import vector_dtype

    assert vector_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert vector_dtype(torch.bfloat16, "cpu") == torch.float32
    assert vector_dtype(torch.float32, "cuda:0") == torch.float32


def grouped_batches(seed: int, spans_per_batch=(5, 40, 17), max_vectors=4):
    """Batches as SpanMemory adds them: spans 0, 1, 2, ... in order, each with its 1..max_vectors vectors together."""
    generator = torch.Generator().manual_seed(seed)
    batches, first_span = [], 0
    for n_spans in spans_per_batch:
        counts = torch.randint(1, max_vectors + 1, (n_spans,), generator=generator)
        span_ids = torch.repeat_interleave(torch.arange(first_span, first_span + n_spans), counts)
        batches.append((torch.randn(NHEADS_KV, span_ids.numel(), DIM, generator=generator), span_ids))
        first_span += n_spans
    return batches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 80])
def test_spans_added_together_are_scored_from_the_slot_tables(device, k):
    batches = grouped_batches(seed=k)
    index = make_index("torch", NHEADS_KV, DIM, device)
    for vectors, span_ids in batches:
        index.add(vectors.to(device), span_ids.to(device))
    assert index.captured_search_ready() and index.per_span_rows == 4
    queries, scores, ids = assert_searches_as_reference(index, batches, n_queries=4, k=k, seed=3)
    n_slots = index.n_spans + 9  # a captured step's slots: span ids, then empty slots
    n_vectors = torch.tensor(index.n_vectors, device=device)
    captured_scores, slots = index.search_captured(queries.to(device), k, n_vectors, n_slots)
    got, expected = in_slot_order(slots, captured_scores), in_slot_order(ids, scores)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def in_slot_order(slots, scores):
    """(slots, scores) of each query sorted by slot: the captured search finds what search finds, unsorted."""
    order = slots.sort(dim=-1).indices
    return slots.gather(-1, order), scores.gather(-1, order)


def test_a_span_given_more_vectors_later_is_still_searched_exactly():
    batches = grouped_batches(seed=5)
    batches.append((torch.randn(NHEADS_KV, 3, DIM), torch.tensor([2, 2, 60])))  # span 2 again, then a new one
    index = filled_index("torch", batches)
    assert not index.captured_search_ready()
    assert_searches_as_reference(index, batches, n_queries=3, k=9, seed=4)


def test_an_index_longer_than_one_topk_chunk_is_searched_exactly():
    batches = grouped_batches(seed=11, spans_per_batch=(700, 600), max_vectors=2)
    index = filled_index("torch", batches)
    assert index.n_spans > 1024 and index.captured_search_ready()
    assert_searches_as_reference(index, batches, n_queries=2, k=40, seed=12)
