"""Head votes, the token budget, persistence and retrieval positions, on small hand-made cases."""

import pytest
import torch
from ltri.kernels.settled_votes import faded_votes, pool_votes, votes_to_remember

from ltri.positions import Layout, key_positions
from ltri.retrieval import Persistence, choose_spans, retrieval_queries


def test_votes_average_each_heads_softmax_over_the_spans_it_found():
    # 2 KV heads x 1 query head each; head 0 found spans 3 and 1, head 1 found span 1 only.
    scores = torch.tensor([[[2.0, 0.0]], [[5.0, 0.0]]])
    ids = torch.tensor([[[3, 1]], [[1, -1]]])
    votes = pool_votes(scores, ids, n_spans=5, scale=1.0)
    head0 = torch.tensor([2.0, 0.0]).softmax(0)
    assert torch.allclose(votes[3], head0[0] / 2)
    assert torch.allclose(votes[1], head0[1] / 2 + 1.0 / 2)
    assert torch.isinf(votes[[0, 2, 4]]).all()


def test_max_votes_keep_what_any_one_query_is_sure_of():
    # one sharp query (span 2) among two flat ones (spans 0 and 1): the mean follows the flat ones.
    scores = torch.tensor([[[9.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    ids = torch.tensor([[[2, 0], [0, 1], [0, 1]]])
    mean = pool_votes(scores, ids, n_spans=3, scale=1.0)
    sure = pool_votes(scores, ids, n_spans=3, scale=1.0, how="max")
    assert mean.argmax().item() == 0 and sure.argmax().item() == 2
    assert torch.allclose(sure[2], torch.tensor([9.0, 0.0]).softmax(0)[0])


def test_budget_takes_the_best_spans_that_fit_and_returns_them_in_document_order():
    votes = torch.tensor([0.1, 0.5, float("-inf"), 0.3, 0.2])
    lengths = torch.tensor([10, 20, 5, 30, 15])
    assert choose_spans(votes, lengths, budget=50).tolist() == [1, 3]
    assert choose_spans(votes, lengths, budget=10**6).tolist() == [0, 1, 3, 4]
    assert choose_spans(votes, lengths, budget=0).tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_the_best_m_votes_choose_what_sorting_every_span_chose(seed):
    """With max_spans the most spans the budget can hold, the top-m candidates give the full sort's choice."""
    generator = torch.Generator().manual_seed(seed)
    n_spans, budget = 3000, 512
    lengths = torch.randint(8, 129, (n_spans,), generator=generator)
    votes = torch.rand(n_spans, generator=generator)
    votes[torch.randperm(n_spans, generator=generator)[:400]] = float("-inf")
    order = torch.argsort(votes, descending=True, stable=True)
    fits = (torch.cumsum(lengths[order], 0) <= budget) & torch.isfinite(votes[order])
    expected = order[fits].sort().values
    assert torch.equal(choose_spans(votes, lengths, budget, max_spans=budget // int(lengths.min())), expected)
    assert torch.equal(choose_spans(votes, lengths, budget), expected)


def test_a_spans_vote_fades_over_steps_instead_of_vanishing():
    persistence = Persistence(decay=0.5)

    def settled(votes, persistence=persistence):
        """What settled votes do with persistence once the votes are pooled: fade, then remember."""
        persist = persistence.args(votes.numel(), "cpu")
        effective = faded_votes(votes, persist.remembered, persist.decay) if persist.decay > 0 else votes
        persist.remembered[: votes.numel()] = votes_to_remember(effective)
        return effective

    first = torch.tensor([0.8, 0.1, float("-inf")])
    assert torch.equal(settled(first), first)
    now = torch.tensor([float("-inf"), 0.3, 0.2])
    effective = settled(now)
    assert torch.allclose(
        effective, torch.tensor([0.4, 0.3, 0.2])
    )  # span 0 not found now but remembered; span 1 beats its memory
    assert torch.allclose(settled(torch.full((3,), float("-inf"))), torch.tensor([0.2, 0.15, 0.1]))
    assert torch.equal(settled(now, Persistence(decay=0.0)), now)


def test_a_chunk_asks_with_the_mean_of_its_queries_per_head():
    queries = torch.randn(1, 6, 5, 8)
    got = retrieval_queries(queries, nheads_kv=2, max_voting_queries=4)
    assert got.shape == (2, 3, 8)
    assert torch.allclose(got[1, 2], queries[0, 5].mean(0))


def test_a_short_chunk_votes_with_its_last_queries_when_a_voting_window_is_set():
    queries = torch.randn(1, 6, 5, 8)  # 6 query heads over 2 KV heads: groups of 3
    every = retrieval_queries(queries, nheads_kv=2, max_voting_queries=8)
    assert every.shape == (2, 15, 8) and torch.equal(every[1, 14], queries[0, 5, 4])
    last_two = retrieval_queries(queries, nheads_kv=2, max_voting_queries=8, voting_window=2)
    assert last_two.shape == (2, 6, 8)
    assert torch.equal(last_two[0], queries[0, :3, 3:].reshape(6, 8))  # head by head, its last two queries
    assert torch.equal(retrieval_queries(queries, 2, 8, voting_window=9), every)  # a window over the chunk: all
    long_chunk = retrieval_queries(queries, nheads_kv=2, max_voting_queries=4, voting_window=2)
    assert long_chunk.shape == (2, 3, 8)  # a long chunk still asks with its mean queries
    from ltri import LtriError, RetrievalConfig

    with pytest.raises(LtriError, match="voting_window"):
        RetrievalConfig(voting_window=-1)


def test_one_angle_puts_all_retrieved_tokens_at_one_position():
    layout = Layout(n_sink=2, n_retrieved=3, n_window=2)
    resident = torch.tensor([0, 1, 50, 51, 52, 90, 91])
    chunk = torch.tensor([92, 93])
    assert key_positions("one_angle", resident, chunk, layout).tolist() == [0, 1, 2, 2, 2, 3, 4, 5, 6]
    assert key_positions("compact", resident, chunk, layout).tolist() == list(range(9))
    assert key_positions("true", resident, chunk, layout).tolist() == [0, 1, 50, 51, 52, 90, 91, 92, 93]
    no_retrieval = Layout(n_sink=2, n_window=5)
    assert key_positions("one_angle", resident, chunk, no_retrieval).tolist() == list(range(9))


def test_a_query_turned_by_the_score_distance_scores_keys_as_the_model_would_from_that_far():
    from support import tiny_llama

    from ltri import LtriConfig, RetrievalConfig
    from ltri.attention import RetrievalFrame
    from ltri.positions import Rotary

    model = tiny_llama(seed=1)
    rotary = Rotary(model.get_decoder().rotary_emb)
    config = LtriConfig(retrieval=RetrievalConfig(score_distance=300))
    frame = RetrievalFrame.for_config(config, rotary, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)
    at = lambda x, position: rotary.table(torch.tensor([position]), x).rotate(x)  # noqa: E731
    model_logit = (at(query, 1000) * at(key, 700)).sum()
    assert abs((frame(query) * key).sum().item() - model_logit.item()) < 1e-4  # float32 RoPE at position 1000
    assert RetrievalFrame.for_config(LtriConfig(), rotary, "cpu", torch.float32) is None


@pytest.mark.parametrize("reading_vote, expected_reading", [(None, "max"), ("mean", "mean")])
def test_the_texts_long_chunks_pool_by_reading_vote_and_questions_and_steps_by_vote(
    monkeypatch, reading_vote, expected_reading
):
    from support import byte_tokenizer, tiny_llama

    import ltri.span_memory
    from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig

    pooled = []  # (q_len of the retrieving chunk, how)
    original_votes = ltri.span_memory.SpanMemory.votes
    original_settled = ltri.span_memory.settled_votes

    def watched_settled(scores, span_ids, n_slots, scale, how, *args, **kwargs):
        pooled.append(how)
        return original_settled(scores, span_ids, n_slots, scale, how, *args, **kwargs)

    def watched_votes(memory, scores, span_ids, n_slots, n_rows, reading=False):
        pooled.append("reading" if reading else "short")
        return original_votes(memory, scores, span_ids, n_slots, n_rows, reading)

    monkeypatch.setattr(ltri.span_memory, "settled_votes", watched_settled)
    monkeypatch.setattr(ltri.span_memory.SpanMemory, "votes", watched_votes)
    config = LtriConfig(
        memory=MemoryConfig(policy="ltri", n_sink=8, n_window=64),
        spans=SpanConfig(min_len=4, max_len=24),
        retrieval=RetrievalConfig(budget=48, max_voting_queries=16, vote="max", reading_vote=reading_vote),
        chunk_size=100,
    )
    session = Session(tiny_llama(seed=5), config, tokenizer=byte_tokenizer())
    session.prefill(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(3)).tolist())
    session.ask("Why?", max_new_tokens=2)
    kinds = list(zip(pooled[::2], pooled[1::2], strict=True))
    assert ("reading", expected_reading) in kinds and ("short", "max") in kinds
    assert set(kinds) <= {("reading", expected_reading), ("short", "max")}
