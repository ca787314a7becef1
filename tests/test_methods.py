"""Named methods: each preset is the config it says, and each one reads and answers through a Session."""

from dataclasses import replace

import pytest
import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, LtriError, MemoryConfig, RetrievalConfig, Session, SpanConfig
from ltri.filler import filler_text
from ltri.methods import INFLLM_BLOCK, INFLLM_REPRESENTATIVES, METHODS, QUEST_PAGE, method_config
from ltri.span_memory import SpanMemory, fixed_segmentation
from ltri.span_vectors import vectors_per_span

BASE = LtriConfig(
    memory=MemoryConfig(n_sink=16, n_window=256),
    retrieval=RetrievalConfig(budget=4096, backend="torch", cache_mb=8),
    chunk_size=128,
    device="cpu",
    dtype="float32",
)


def shared(config: LtriConfig) -> tuple:
    """What every method keeps from the base: sinks, window, budget, backend, cache, chunk, device, dtype."""
    return (
        config.memory.n_sink,
        config.memory.n_window,
        config.retrieval.budget,
        config.retrieval.backend,
        config.retrieval.cache_mb,
        config.chunk_size,
        config.device,
        config.dtype,
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_base_resources_and_budget(method):
    assert shared(method_config(method, BASE)) == shared(BASE)


def test_ltri_is_the_base_config_and_full_and_streaming_only_change_the_policy():
    assert method_config("ltri", BASE) == BASE
    assert method_config("ltri") == LtriConfig()
    for policy in ("full", "streaming"):
        assert method_config(policy, BASE) == replace(BASE, memory=replace(BASE.memory, policy=policy))


def test_infllm_is_fixed_blocks_with_four_representative_keys_one_angle_and_no_extras():
    config = method_config("infllm", BASE)
    assert config.memory.policy == "ltri"
    assert config.spans == SpanConfig(
        segmentation="fixed", max_len=INFLLM_BLOCK, index_vectors="keys", max_vectors=INFLLM_REPRESENTATIVES
    )
    assert (config.spans.max_len, config.spans.max_vectors) == (128, 4)
    assert config.position_mode == "one_angle"
    assert config.retrieval.persistence == 0 and config.retrieval.collaboration == 0
    assert config.retrieval.selector == "none" and config.retrieval.query_dims == "all"


def test_quest_is_pages_of_sixteen_bounds_true_positions_and_no_extras():
    config = method_config("quest", BASE)
    assert config.memory.policy == "ltri"
    assert config.spans == SpanConfig(segmentation="fixed", min_len=8, max_len=QUEST_PAGE, index_vectors="bounds")
    assert config.spans.max_len == 16
    assert config.position_mode == "true"
    assert config.retrieval.persistence == 0 and config.retrieval.collaboration == 0


@pytest.mark.parametrize("method", ["infllm", "quest"])
def test_one_query_can_fill_the_budget_with_fixed_blocks(method):
    config = method_config(method, BASE)
    assert config.retrieval.search_k * config.spans.max_len >= BASE.retrieval.budget
    assert config.retrieval.search_k >= RetrievalConfig().search_k


def test_unknown_method_is_refused():
    with pytest.raises(LtriError, match="Unknown method"):
        method_config("h2o", BASE)


@pytest.mark.parametrize("n_tokens", [INFLLM_BLOCK * 3, INFLLM_BLOCK * 2 + 37])
def test_fixed_blocks_get_exactly_max_vectors_keys(n_tokens):
    segmentation = fixed_segmentation(n_tokens, INFLLM_BLOCK, torch.device("cpu"))
    counts = vectors_per_span(segmentation, INFLLM_REPRESENTATIVES)
    assert counts.tolist() == [INFLLM_REPRESENTATIVES] * segmentation.n_spans


@pytest.mark.parametrize("method", METHODS)
def test_each_method_reads_and_answers_through_a_session(method):
    config = method_config(method, BASE)
    session = Session(tiny_llama(), config, tokenizer=byte_tokenizer())
    fed = session.feed(filler_text(20, seed=5))
    answer = session.ask("Who walked to the library?", max_new_tokens=4)
    stats = session.stats()
    session.close()
    assert fed > BASE.memory.n_sink + BASE.memory.n_window + INFLLM_BLOCK
    assert isinstance(answer, str) and len(session.last_answer_tokens) >= 1
    assert stats.policy == config.memory.policy
    if config.memory.policy == "ltri":
        assert stats.spans > 0


def test_infllm_stores_four_keys_per_block_of_128_tokens():
    """The prefill chunks (of 128 tokens here) are cut into 128-token blocks, the first one after the sinks
    shorter, each with 4 index vectors per KV head."""
    config = method_config("infllm", BASE)
    session = Session(tiny_llama(), config, tokenizer=byte_tokenizer())
    session.feed(filler_text(24, seed=6))
    memory = session.cache.memories()[0]
    assert isinstance(memory, SpanMemory) and memory.n_spans > 0
    first_block = BASE.chunk_size - BASE.memory.n_sink
    assert memory.span_lengths.tolist() == [first_block] + [INFLLM_BLOCK] * (memory.n_spans - 1)
    vectors, _ = memory.index._raw_vectors()
    assert vectors.shape[1] == INFLLM_REPRESENTATIVES * memory.n_spans
    session.close()


def test_quest_stores_pages_of_sixteen_tokens_with_one_bound_each():
    config = method_config("quest", BASE)
    session = Session(tiny_llama(), config, tokenizer=byte_tokenizer())
    session.feed(filler_text(24, seed=6))
    memory = session.cache.memories()[0]
    assert memory.n_spans > 0 and memory.span_lengths.tolist() == [QUEST_PAGE] * memory.n_spans  # 16 divides 112
    vectors, _ = memory.index._raw_vectors()
    assert vectors.shape[1] == memory.n_spans and vectors.shape[2] == 2 * memory.kv_shape[1]
    session.close()
