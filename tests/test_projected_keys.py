"""Loki's projections of the stored keys (ltri.offload.projected_keys) kept in host rows beside the keys: every
stored token's projection, as project_keys makes it, from the first eviction on, through decode steps' evictions
and a reopened store; caught up from the host rows where they start late; what the decode step scores with."""

from __future__ import annotations

import pytest
import torch
from captured_sessions import TEXT, decode, session_for
from ltri.kernels.lowrank_scores import pca_basis, project_keys

from ltri import Session
from ltri.offload import projected_keys
from ltri.offload.host_payloads import HostPayloads
from ltri.offload.projected_keys import ProjectedKeys
from ltri.token_selection import TokenSelector

LOKI = {"selector": "loki", "select_tokens": 20, "select_rank": 4}


def assert_projections_of_the_host_rows(session: Session, rank: int = 4) -> None:
    for memory in session.cache.memories():
        rows, projections = memory.host_payloads, memory.projected_keys
        assert projections is not None and projections.length == rows.length == memory.tables.n_rows > 0
        keys = rows.tokens[: rows.length, 0].transpose(0, 1)  # (nheads_kv, n, headdim)
        expected = project_keys(keys, memory.basis, rank)
        assert torch.equal(projections.scored()[:, : rows.length], expected)
        nheads_kv, headdim = memory.kv_shape  # float32 rows: keys and values, then the projections
        assert memory.host_row_bytes() == rows.length * nheads_kv * (2 * headdim + rank) * 4


def test_each_stored_token_keeps_its_projection_while_reading_and_decoding():
    session = session_for("always", **LOKI)
    session.prefill(TEXT)
    assert_projections_of_the_host_rows(session)
    decode(session, 30)  # the steps' evictions store more tokens
    assert_projections_of_the_host_rows(session)
    layers, memories = session._captured.layers, session.cache.memories()
    assert all(layer.projections is memory.projected_keys for layer, memory in zip(layers, memories, strict=True))


def test_only_loki_with_host_rows_keeps_projections():
    sparq = session_for("always", selector="sparq", select_tokens=20, select_rank=4)
    without_rows = session_for("never", **LOKI)
    for session in (sparq, without_rows):
        session.prefill(TEXT)
        assert all(memory.projected_keys is None for memory in session.cache.memories())


def test_a_reopened_store_projects_the_tokens_it_reads_back(tmp_path):
    saved = session_for("always", **LOKI)
    saved.reset(store=tmp_path / "store")
    saved.prefill(TEXT)
    saved.save()
    config = saved.config
    expected = [m.projected_keys.scored()[:, : m.projected_keys.length].clone() for m in saved.cache.memories()]
    saved.close()
    model, tokenizer = saved.model, saved.tokenizer
    reopened = Session.open(tmp_path / "store", model=model, tokenizer=tokenizer, config=config)
    assert_projections_of_the_host_rows(reopened)
    for memory, before in zip(reopened.cache.memories(), expected, strict=True):
        assert torch.equal(memory.projected_keys.scored()[:, : memory.projected_keys.length], before)


def test_projections_started_late_catch_up_from_the_host_rows(monkeypatch):
    monkeypatch.setattr(projected_keys, "CATCH_UP_TOKENS", 7)  # several batches
    gen = torch.Generator().manual_seed(0)
    rows = HostPayloads(3, 32, torch.float32, "cpu", max_tokens=200)
    keys = torch.randn(3, 50, 32, generator=gen)
    rows.append(keys, -keys)
    basis = pca_basis(keys)
    projections = ProjectedKeys(basis, 8, torch.float32, max_tokens=200)
    projections.catch_up(rows)  # 50 tokens read back from the rows
    more = torch.randn(3, 20, 32, generator=gen)
    rows.append(more, more)
    monkeypatch.setattr(rows, "device_view", lambda: pytest.fail("the caller's keys are not read back"))
    projections.catch_up(rows, stored_keys=more)
    assert projections.length == 70
    expected = project_keys(torch.cat([keys, more], dim=1), basis, 8)
    torch.testing.assert_close(projections.scored()[:, :70], expected, rtol=1e-6, atol=1e-6)


def test_scores_read_stored_projections_in_place_as_they_would_project_the_keys():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 300, 32, generator=gen)
    query = torch.randn(1, 6, 1, 32, generator=gen)
    selector = TokenSelector("loki", 40, rank=8, basis=pca_basis(keys))
    stored = selector.scored_keys(keys).transpose(0, 1).contiguous().transpose(0, 1)  # token-major, as in host rows
    rows = torch.randperm(300, generator=gen)[:120].sort().values
    in_place = selector.best(query, stored, rows=rows)
    gathered = selector.best(query, selector.scored_keys(keys[:, rows]))
    assert torch.equal(in_place, gathered)
