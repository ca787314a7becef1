"""RoPE tables: the kept prefix table of positions 0..n-1 is the table the model's rotary module gives."""

import pytest
import torch
from support import tiny_llama

from ltri.positions import Rotary

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_tables_are_the_modules_tables(rope, dtype):
    rotary = Rotary(tiny_llama(rope=ROPES[rope]).model.rotary_emb)
    like = torch.empty(0, dtype=dtype)
    for n in (5, 4097, 300, 9000):  # grows past the first kept table, then shrinks
        got = rotary.prefix_table(n, like)
        expected = rotary.table(torch.arange(n), like)
        assert got.cos.dtype == dtype
        assert torch.equal(got.cos, expected.cos) and torch.equal(got.sin, expected.sin)


def test_dynamic_variants_compute_each_table():
    assert not Rotary(tiny_llama(rope=ROPES["dynamic"]).model.rotary_emb).prefixes_are_stable
    assert Rotary(tiny_llama(rope=ROPES["yarn"]).model.rotary_emb).prefixes_are_stable
