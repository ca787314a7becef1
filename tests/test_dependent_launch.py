"""Dependent launches (kernels/dependent_launch.py): when the kernels ask for them, and, on a GPU of sm_90 or later,
that a chain of dependent kernels captured in a CUDA graph gives what plain launches give, bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ltri.kernels import dependent_launch


@pytest.fixture
def restore_setting():
    yield
    dependent_launch.set_enabled(None)


def test_cpu_tensors_never_launch_dependently(restore_setting):
    dependent_launch.set_enabled(True)
    assert dependent_launch.launch_options(torch.device("cpu")) == {"PDL": False}


def test_the_interpreter_never_launches_dependently(restore_setting, monkeypatch):
    monkeypatch.setattr(dependent_launch, "device_allows", lambda device: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dependent_launch.launch_options(torch.device("cuda")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dependent_launch.launch_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}


def test_the_environment_and_set_enabled_turn_it_off(restore_setting, monkeypatch):
    monkeypatch.setattr(dependent_launch, "device_allows", lambda device: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LTRI_PDL", "0")
    assert dependent_launch.launch_options(torch.device("cuda")) == {"PDL": False}
    dependent_launch.set_enabled(True)  # the explicit choice wins over the environment
    assert dependent_launch.launch_options(torch.device("cuda"))["PDL"] is True
    dependent_launch.set_enabled(False)
    monkeypatch.delenv("LTRI_PDL")
    assert dependent_launch.launch_options(torch.device("cuda")) == {"PDL": False}
    dependent_launch.set_enabled(None)
    assert dependent_launch.wanted()  # on by default


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or not _sm90(), reason="needs a GPU of sm_90 or later")
def test_a_graph_of_dependent_kernels_equals_plain_launches(restore_setting):
    """Loki scores -> top-k -> attention over the chosen tokens, three layers back to back in one CUDA graph (each
    kernel reads what the one before it wrote), with and without dependent launches: the same bits."""
    from ltri.kernels.lowrank_scores import lowrank_scores, pca_basis, project_keys
    from ltri.kernels.selected_attention import selected_attention
    from ltri.kernels.topk_select import topk_tokens

    generator = torch.Generator(device="cuda").manual_seed(0)
    nheads, nheads_kv, headdim, n_src, n_sel, n_res, rank = 32, 8, 128, 4096, 512, 320, 16

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda").to(torch.bfloat16)

    layers = []
    for _ in range(3):
        k_src, v_src = randn(nheads_kv, n_src, headdim), randn(nheads_kv, n_src, headdim)
        basis = pca_basis(k_src)
        layers.append((k_src, v_src, basis, project_keys(k_src, basis, rank), randn(nheads_kv, n_res, headdim),
                       randn(nheads_kv, n_res, headdim)))  # fmt: skip
    q, q_cos, q_sin = randn(nheads, headdim), randn(headdim), randn(headdim)
    cos, sin = randn(n_sel, headdim), randn(n_sel, headdim)

    def step():
        outs = []
        for k_src, v_src, basis, k_low, k_res, v_res in layers:
            idx = topk_tokens(lowrank_scores(q, k_low, basis, rank), n_sel)
            outs.append(selected_attention(q, q_cos, q_sin, k_res, v_res, k_src, v_src, idx, cos, sin)[0])
        return torch.stack(outs)

    results = {}
    for enabled in (False, True):
        dependent_launch.set_enabled(enabled)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[enabled] = out.clone()
    assert torch.equal(results[True], results[False])
