"""One-token forwards walk the layers themselves (ltri.decode_step): same logits as transformers' forward.

With the full policy every step attends to everything, so a Session fed one token at a time must give the
model's own logits, for every supported model family (qwen3 normalizes queries and keys per head). On CUDA
the dense segments are CUDA graphs: they must give what the eager segments give.
"""

from dataclasses import replace

import pytest
import torch
from support import byte_tokenizer, tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ltri import LtriConfig, MemoryConfig, Session
from ltri.decode_step import RMS_NORMS, DecodeStep, decoder_layers, dense_kernels_fit
from ltri.fused_projections import fuse_projections

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


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_kernels_give_the_modules_outputs(family, monkeypatch):
    """A layer's projections and output with its norms and MLP activation as ltri's kernels (in Triton's interpreter
    here; a decode step uses them on CUDA only) against the modules' own."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():  # scales other than their initial ones
        if type(module).__name__ in RMS_NORMS:
            module.weight.data = 1 + 0.3 * torch.randn(module.weight.shape, generator=generator)
    layers = decoder_layers(model.to(device))
    assert all(dense_kernels_fit(layer) for layer in layers)
    hidden = torch.randn(1, 1, 64, generator=generator).to(device)
    attention = torch.randn(1, 4, 1, 16, generator=generator).to(device)
    addend = torch.randn(1, 1, 64, generator=generator).to(device)
    with torch.no_grad():
        for layer in layers:
            joined = fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp)
            for with_kernels in (replace(layer, dense_kernels=True), replace(layer, dense_kernels=True, fused=joined)):
                for args in ((hidden,), (hidden, addend)):
                    for plain, fused in zip(layer.project(*args), with_kernels.project(*args), strict=True):
                        assert fused.shape == plain.shape and torch.allclose(fused, plain, atol=1e-5)
                finished = zip(layer.finish(hidden, attention), with_kernels.finish(hidden, attention), strict=True)
                for plain, fused in finished:
                    assert fused.shape == plain.shape and torch.allclose(fused, plain, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a decode step uses the dense kernels on CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_step_with_dense_kernels_on_cuda(family):
    model = tiny_model(family).to("cuda", torch.bfloat16)
    token = torch.tensor([5], device="cuda")
    with torch.inference_mode():
        plain = DecodeStep.for_model(model, use_graphs=False, dense_kernels=False)
        fused = DecodeStep.for_model(model, use_graphs=False)
        assert all(layer.dense_kernels and layer.fused is not None for layer in fused.layers)
        assert not any(layer.dense_kernels for layer in plain.layers)
        expected, got = plain(token, no_attention), fused(token, no_attention)
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_joined_projections_give_the_modules_outputs_and_keep_one_copy(family):
    """q, k, v and gate, up as two joined weights (qwen2's biases too): the modules' outputs, the modules' own
    parameters then rows of the joined weights; joining them again (a second session) copies nothing."""
    model = tiny_model(family)
    layer = decoder_layers(model)[0]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4))
    projections = (layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj)
    with torch.no_grad():
        expected = [proj(x) for proj in projections]
        fused = fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp)
        got = [*fused.qkv(x), *fused.gate_up(x)]
        again = fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp)
        after = [proj(x) for proj in projections]
    for want, have, module_now in zip(expected, got, after, strict=True):
        assert have.shape == want.shape and torch.allclose(have, want, atol=1e-6)
        assert torch.equal(module_now, want)
    assert fused.qkv_sizes == (64, 32, 32) and fused.intermediate == 128
    assert layer.k_proj.weight.data_ptr() == fused.qkv_weight.data_ptr() + 64 * 64 * 4
    assert again.qkv_weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert again.gate_up_weight.data_ptr() == fused.gate_up_weight.data_ptr()
    assert (fused.qkv_bias is not None) == (family == "qwen2")


def test_a_model_with_joined_projections_saves_and_loads_as_before(tmp_path):
    """The modules' parameters are rows of the joined weights: save_pretrained still writes each one, and the model
    loads back with the same weights."""
    model = tiny_model("llama")
    for layer in decoder_layers(model):
        assert fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp) is not None
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_projections_stay_apart_unless_plain_linears_alike():
    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    weight = layer.k_proj.weight.data_ptr()
    layer.k_proj.register_forward_hook(lambda *args: None)
    assert fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp) is None
    layer = decoder_layers(model)[1]
    layer.v_proj.to(torch.float16)
    assert fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp) is None
    assert decoder_layers(model)[0].k_proj.weight.data_ptr() == weight  # nothing re-pointed


def test_dense_kernels_only_for_the_modules_they_compute():
    model = tiny_llama()
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(model.config.hidden_size)
    fits = [dense_kernels_fit(layer) for layer in decoder_layers(model)]
    assert fits == [True, False] + [True] * (len(fits) - 2)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert not dense_kernels_fit(decoder_layers(model)[0])


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
