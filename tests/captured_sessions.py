"""Sessions the captured decode tests share: a tiny 3-layer model whose memory stores spans within a 900-token
text, and greedy decoding that records each step's logits and retrieved spans."""

from __future__ import annotations

import torch
from support import byte_tokenizer, tiny_llama

from ltri import LtriConfig, MemoryConfig, RetrievalConfig, Session, SpanConfig

TEXT = torch.randint(0, 256, (900,), generator=torch.Generator().manual_seed(3)).tolist()
# token selection: each KV head keeps 20 of the budget's 48 retrieved tokens
SPARQ = {"selector": "sparq", "select_tokens": 20, "select_rank": 4}
LOKI = {"selector": "loki", "select_tokens": 20, "select_rank": 4}


def session_for(
    host_payloads: str, device: str = "cpu", dtype=torch.float32, spans: dict | None = None, row_cache: bool = True,
    **retrieval,
) -> Session:  # fmt: skip
    model = tiny_llama(n_layers=3).to(device, dtype)
    config = LtriConfig(
        memory=MemoryConfig(n_sink=8, n_window=64, host_payloads=host_payloads, row_cache=row_cache),
        spans=SpanConfig(min_len=4, max_len=16, **(spans or {})),
        retrieval=RetrievalConfig(budget=48, search_k=8, backend="torch", **retrieval),
        chunk_size=64,
    )
    return Session(model, config, tokenizer=byte_tokenizer())


def decode(session: Session, n_steps: int) -> tuple[torch.Tensor, list]:
    """Logits of n_steps greedy steps after the text, and each step's retrieved spans per layer."""
    return decode_after(session, session.prefill(TEXT), n_steps)


def decode_after(session: Session, logits: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, list]:
    """decode's steps after a prefill that returned logits."""
    steps, retrieved = [], []
    for _ in range(n_steps):
        logits = session.prefill([int(logits[-1].argmax())])
        steps.append(logits[-1])
        retrieved.append([memory.last_retrieved.tolist() for memory in session.cache.memories()])
    return torch.stack(steps), retrieved
