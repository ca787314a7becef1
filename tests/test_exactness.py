"""With the full policy, ltri computes exactly the model's own attention, whatever the chunking."""

import pytest
import torch
from support import DEVICES, byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, Session

FULL = MemoryConfig(policy="full")

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    # yarn scales cos/sin by an attention factor != 1: the pre-RoPE recovery must undo it.
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("chunk_size", [1, 7, 97, 256, 1000])
@pytest.mark.parametrize("position_mode", ["compact", "true"])
def test_full_policy_matches_sdpa_forward(device, rope, chunk_size, position_mode):
    model = tiny_llama(rope=ROPES[rope]).to(device)
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(1)).to(device)
    expected = reference_logits(model, ids)
    session = Session(
        model, LtriConfig(memory=FULL, chunk_size=chunk_size, position_mode=position_mode), tokenizer=byte_tokenizer()
    )
    got = session.prefill(ids.tolist(), all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [7, 128])
def test_bfloat16_error_is_that_of_the_models_own_bfloat16_forward(device, chunk_size):
    """In bf16, ltri's error against the float32 model is at most twice sdpa's own bf16 error + a small atol."""
    model = tiny_llama(n_layers=2, seed=6).to(device)
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(6)).to(device)
    exact = reference_logits(model, ids)
    model.to(torch.bfloat16)
    sdpa_error = (reference_logits(model, ids).float() - exact).abs().max().item()
    session = Session(model, LtriConfig(memory=FULL, chunk_size=chunk_size), tokenizer=byte_tokenizer())
    ltri_error = (session.prefill(ids.tolist(), all_logits=True) - exact).abs().max().item()
    assert ltri_error <= 2 * sdpa_error + 1e-2, (ltri_error, sdpa_error)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_gqa_groups_and_decode_steps(n_heads, n_kv_heads):
    """Prefill in chunks then one token at a time (the decode path) equals one full forward."""
    model = tiny_llama(n_heads=n_heads, n_kv_heads=n_kv_heads, seed=3)
    ids = torch.randint(0, 256, (230,), generator=torch.Generator().manual_seed(2))
    expected = reference_logits(model, ids)
    session = Session(model, LtriConfig(memory=FULL, chunk_size=64), tokenizer=byte_tokenizer())
    prefill = session.prefill(ids[:200].tolist(), all_logits=True)
    decoded = torch.stack([session.prefill([int(t)]) for t in ids[200:]])
    got = torch.cat([prefill, decoded])
    assert (got - expected).abs().max().item() < 1e-4


def test_streaming_equals_full_while_the_text_fits_in_its_window():
    model = tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    tokenizer = byte_tokenizer()
    streaming = MemoryConfig(policy="streaming", n_sink=8, n_window=400)
    full = Session(model, LtriConfig(memory=FULL, chunk_size=50), tokenizer=tokenizer).prefill(ids, all_logits=True)
    got = Session(model, LtriConfig(memory=streaming, chunk_size=50), tokenizer=tokenizer).prefill(ids, all_logits=True)
    assert (got - full).abs().max().item() < 1e-5


def test_model_generate_still_works_after_ltri_registration():
    """Without ltri's step context the registered attention falls back to sdpa."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    Session(model, LtriConfig(), tokenizer=byte_tokenizer())  # switches the model to "ltri"
    assert model.config._attn_implementation == "ltri"
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
