"""Memory policies: streaming stays bounded however long the text; full keeps everything."""

import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, Session
from ltri.filler import filler_text
from ltri.memory import FullMemory, StreamingMemory


def test_streaming_memory_stays_bounded_over_20k_tokens():
    n_sink, n_window = 16, 512
    config = LtriConfig(memory=MemoryConfig(policy="streaming", n_sink=n_sink, n_window=n_window), chunk_size=512)
    session = Session(tiny_llama(), config, tokenizer=byte_tokenizer())
    text = filler_text(400, seed=7)
    assert len(text.encode()) > 20_000
    resident_seen, bytes_seen = [], []

    def watch(done, total):
        stats = session.stats()
        resident_seen.append(stats.resident_tokens)
        bytes_seen.append(stats.memory_bytes)

    fed = session.feed(text, progress=watch)
    assert fed > 20_000 and session.stats().tokens_seen == fed
    assert max(resident_seen) == n_sink + n_window
    # Memory stops growing once the window has filled: the last 3/4 of the text costs nothing more.
    assert len(set(bytes_seen[len(bytes_seen) // 4 :])) == 1
    layers, kv_heads, head_dim, float32 = 3, 2, 16, 4
    bound = layers * 2 * kv_heads * (n_sink + 2 * n_window) * head_dim * float32
    assert max(bytes_seen) <= bound


def test_full_memory_grows_with_the_text():
    config = LtriConfig(memory=MemoryConfig(policy="full"), chunk_size=256)
    session = Session(tiny_llama(), config, tokenizer=byte_tokenizer())
    fed = session.feed(filler_text(40, seed=1))
    assert session.stats().resident_tokens == fed


def test_streaming_keeps_the_first_and_the_last_tokens():
    memory = StreamingMemory(n_sink=3, n_window=5)
    keys = torch.arange(40, dtype=torch.float32).reshape(1, 1, 40, 1)
    for start in range(0, 40, 7):
        piece = slice(start, min(start + 7, 40))
        memory.append(keys[:, :, piece], keys[:, :, piece], torch.arange(40)[piece])
    resident = memory.resident(queries=torch.zeros(1, 1, 1, 1))
    assert resident.positions.tolist() == [0, 1, 2, 35, 36, 37, 38, 39]
    assert resident.keys.flatten().tolist() == [0, 1, 2, 35, 36, 37, 38, 39]


def test_full_memory_returns_tokens_in_order():
    memory = FullMemory()
    assert memory.resident(torch.zeros(1, 1, 1, 1)) is None
    values = torch.randn(1, 2, 300, 4)
    for start in range(0, 300, 64):
        memory.append(
            values[:, :, start : start + 64],
            values[:, :, start : start + 64],
            torch.arange(start, min(start + 64, 300)),
        )
    resident = memory.resident(torch.zeros(1, 1, 1, 1))
    assert torch.equal(resident.keys, values) and resident.positions.tolist() == list(range(300))
