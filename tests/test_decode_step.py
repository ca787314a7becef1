"""One-token forwards walk the layers themselves (ltri.decode_step): same logits as transformers' forward.

With the full policy every step attends to everything, so a Session fed one token at a time must give the
model's own logits, for every supported model family (qwen3 normalizes queries and keys per head). On CUDA
the dense segments are CUDA graphs: they must give what the eager segments give.
"""

import pytest
import torch
from support import byte_tokenizer, tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ltri import LtriConfig, MemoryConfig, Session
from ltri.decode_step import DecodeStep, decoder_layers

FULL = MemoryConfig(policy="full")
FAMILIES = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
FAMILIES["qwen3"] = (Qwen3Config, Qwen3ForCausalLM)


def tiny_model(family: str, seed: int = 0):
    if family == "llama":
        return tiny_llama(seed=seed)
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=256,
        pad_token_id=256,
    )
    model = model_class(config).eval()
    if family == "qwen2":  # random biases: the projections' biases must be applied too
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(projection.bias, std=0.5)
    model.set_attn_implementation("sdpa")
    return model


def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_one_token_steps_give_the_models_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(1))
    expected = model_logits(model, ids)
    assert decoder_layers(model) is not None
    session = Session(model, LtriConfig(memory=FULL, chunk_size=40), tokenizer=byte_tokenizer())
    assert session._decode_step is not None
    prefill = session.prefill(ids[:80].tolist(), all_logits=True)
    steps = torch.stack([session.prefill([int(token)]) for token in ids[80:]])
    got = torch.cat([prefill, steps])
    assert (got - expected).abs().max().item() < 1e-4


def test_models_laid_out_otherwise_are_left_to_transformers():
    model = tiny_llama()
    del model.model.layers[1].self_attn
    assert decoder_layers(model) is None
    assert decoder_layers(torch.nn.Linear(2, 2)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", ["full", "ltri"])
def test_cuda_graph_segments_equal_eager_segments(family, policy):
    """The same text and decode steps with and without graphs: the same logits, step after step."""
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(2)).tolist()
    memory = MemoryConfig(policy=policy, n_sink=8, n_window=128)
    results = []
    for graphs in (False, True):
        model = tiny_model(family).to("cuda", torch.bfloat16)
        config = LtriConfig(memory=memory, chunk_size=64, cuda_graphs=graphs)
        session = Session(model, config, tokenizer=byte_tokenizer())
        assert session._decode_step.use_graphs == graphs
        session.prefill(ids[:600])
        results.append(torch.stack([session.prefill([token]) for token in ids[600:]]))
    assert torch.equal(results[0], results[1])


def test_graphs_are_off_on_the_cpu():
    step = DecodeStep.for_model(tiny_llama(), use_graphs=True)
    assert step is not None and not step.use_graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_capture_lets_other_threads_wait_for_the_gpu():
    """The span store's writer thread waits for its device-to-host copies (an event's synchronize) whenever it
    has work, also while a decode step captures its graphs: that must not break the capture."""
    import threading

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    step = DecodeStep.for_model(model, use_graphs=True)
    done = threading.Event()
    copy_done = torch.cuda.Event()  # recorded, as the store's copies are, on the main thread's stream before capture
    copy_done.record()

    def writer_like():
        while not done.is_set():
            copy_done.synchronize()

    thread = threading.Thread(target=writer_like)
    thread.start()
    try:
        with torch.inference_mode():  # as the Session runs its forwards
            logits = step(torch.tensor([5], device="cuda"), no_attention)
    finally:
        done.set()
        thread.join()
    with torch.inference_mode():
        eager = DecodeStep.for_model(model, use_graphs=False)(torch.tensor([5], device="cuda"), no_attention)
    assert torch.equal(logits, eager)


def no_attention(index, query, key, value, scaling):
    return torch.zeros_like(query)
