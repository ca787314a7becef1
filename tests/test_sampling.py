"""Sampling: greedy, temperature, top-p, seeds; and a whole ask on a model without a chat template."""

import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, SamplingConfig, Session
from ltri.sampling import _top_p_filter, make_generator, sample_next


def test_greedy_takes_the_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample_next(logits, SamplingConfig(), None) == 1


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    filtered = _top_p_filter(probs.clone(), top_p=0.7)
    assert torch.allclose(filtered, torch.tensor([0.0, 0.5, 0.3, 0.0]) / 0.8)


def test_same_seed_same_samples_and_top_p_never_picks_a_cut_token():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    config = SamplingConfig(temperature=1.0, top_p=0.7, seed=3)
    first = [sample_next(logits, config, gen) for gen in [make_generator(3, torch.device("cpu"))] for _ in range(50)]
    again = [sample_next(logits, config, gen) for gen in [make_generator(3, torch.device("cpu"))] for _ in range(50)]
    assert first == again
    assert set(first) <= {1, 2} and set(first) == {1, 2}


def test_ask_without_a_chat_template_uses_the_plain_question_format():
    session = Session(tiny_llama(), LtriConfig(chunk_size=32), tokenizer=byte_tokenizer())
    session.feed("Some text about the sea.")
    question_ids = session.question_tokens("Where?")
    assert session.tokenizer.decode(question_ids) == "\n\nQuestion: Where?\nAnswer:"
    answer = session.ask("Where?", max_new_tokens=5, temperature=0.8, seed=1)
    assert isinstance(answer, str) and len(session.last_answer_tokens) <= 5
    stats = session.stats()
    assert stats.tokens_seen == len("Some text about the sea.") + len(question_ids) + len(session.last_answer_tokens)
