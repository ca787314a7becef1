"""Decode-step attention of one Llama-3-8B layer: full SDPA against ltri's retrieval, selection and sparse kernel.

    python3 benchmarks/speed/attention.py                      # CUDA: writes results/attention_h100.json
    python3 benchmarks/speed/attention.py --contexts 16k,64k --out /tmp/attention.json
    python3 benchmarks/speed/attention.py --smoke              # CPU, torch references, small sizes: logic check

One decode step (q_len 1) of one layer with 32 query heads, 8 KV heads, headdim 128, bfloat16, per context:

- sdpa_full: torch SDPA over every cached key and value (enable_gqa): the baseline.
- ltri (SparQ selection) and ltri_loki (Loki selection): what an ltri decode step does for one layer, with the
  span payloads already on the GPU (the span cache's best case), fused into nine launches where the span top-k takes
  two stages (SparQ; Loki eight):
  1. span scoring: the queries as [relu(q), min(q, 0)] times each span's [kmax; kmin] bound (Quest; one bound per
     32-token span per KV head), an exact matmul; each query head's span scores are softmax-normalised and
     summed over all heads (the vote: kernels/span_votes.py, two launches); the top budget / 32 spans;
  2. the candidates' token rows (one launch);
  3. token selection: SparQ (r largest |q| components) or Loki (rank r) scores of the candidates, read where they
     lie in the layer's keys (``rows``), top n_select tokens per KV head;
  4. attention over sinks + window (rotated, resident) and the chosen candidates, each key read where it lies
     (through the top-k's positions and the candidates' rows) and rotated to its compact place in registers, the
     query rotated too (kernels/selected_attention.py).
- ltri_unfused: the step as it was before those kernels (83c3791's ltri rows): the votes in five torch launches,
  the candidates' K and V gathered, scored, the selected ones rotated into a resident buffer between the sinks and
  the window, the query rotated, then the sparse attention kernel over that buffer: the same run's comparison.
- sparse_attention_kernel: ltri_unfused's last stage alone (sinks + selected + window in one buffer), with its
  bandwidth on the K/V bytes it reads.
- copy_same_bytes: a copy of those K/V bytes (read + write, counted as copy_gbps counts them), with them: what a
  transfer of that size reaches (its layers_gbps against copy_gbps, measured on 1 GB).
- stages_ms (in each ltri row): every step above timed alone on the previous steps' outputs; in the fused rows also
  torch.topk + torch.sort on the same scores as the top-k selection kernel (the span_topk_torch and token_topk_torch
  stages: what the kernel replaced, measured in the same run).
- selected_attention[N] (with ltri, --sweep-select-splits): the fused step's attention alone with N selected tokens
  per split (no N: the kernel's default), on the inputs the step's earlier stages chose, per layer in the graph.
- topk (a separate list, --sweep-topk): the top-k selection kernel alone on each of the step's selections (span
  votes at 128K and 512K, the candidates' token scores, SparQ's components) per search (radix bits, 0 the binary
  search) and warps, against torch.topk + torch.sort, per call in a graph of --layers score rows.
- pack_rotate (a separate list): the kernel that packs a captured decode step's sinks, retrieved rows and window
  and rotates the keys, against the torch ops it replaced, in the same run.
- kernel_sweep (a separate list): the kernel alone over --sweep-keys keys and several split sizes, against SDPA,
  a copy of the same keys and values (copy_same_bytes: read + write) and a pass that only reads them
  (read_same_bytes[shape], ``read_floor.py``, in several launch shapes: the floor for reading them), to tune the
  split heuristic and to see at which size the kernel's reads approach the copy's rate.

Timing: CUDA events around each call, each call preceded by a 256 MB read that evicts the L2 cache and leaves it
clean (results before 2026-11-26 used a 256 MB write, which left L2 full of dirty lines that a short kernel may
have to write back while it reads; the two were not compared on one machine); median of --reps after --warmup. The
call's launches queue behind that read, which hides only part of their launch overhead, so "ms" includes some of
it (compare it with "graph_ms"); "graph_ms" (ltri rows and the kernel) replays the call
from a CUDA graph: device time without the host's launch overhead, though one graph launch still costs about
as much as one tiny kernel ("one_launch_graph_ms", ~0.005 ms on the H100). "layers_ms" replays the call over
--layers different layers (each its own keys, values and index, so no layer finds another's data in L2) from one
CUDA graph and divides by the layer count: what each layer costs inside a graphed decode step, where 32 layers'
launches run back to back; "layers_gbps" is bytes over it. "wall_ms" is host
time of one synchronised call, launch overhead included. "bytes" is what the method must read at least; "gbps"
is bytes / ms; "floor_ms" is bytes over the copy bandwidth measured in the same run ("copy_gbps": read + write
bytes of a large tensor .copy_ per second). The device's copy of the tree has no .git: pass GIT_SHA.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import itertools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import read_floor  # this script's folder: run it as a script
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "speed" / "results" / "attention_h100.json"
# Launch shapes the sweeps time by default (tests/kernel_build.py builds them all for sm_90 on a CPU).
SWEEP_TILES = "auto,32x4x2,64x4x3,64x8x2,128x8x2"  # sparse attention: keys per block x warps x stages
SWEEP_PACK = "auto,16x4,16x8,32x8"  # pack_rotate: places per program x warps
SWEEP_CHUNK_MAP = "auto,16x64x8,16x64x4,32x64x4,32x128x8"  # chunk map: rows per head x keys per step x warps
SWEEP_TOPK = "auto,4x8,4x32,8x8,8x16,8x32"  # top-k selection: radix bits (0: binary search) x warps
TOPK_CONTEXTS = (131072, 524288)  # the span top-k's rows the top-k sweep times: the votes at these contexts
KERNEL_MODULES = (
    "sparse_attention", "sparq_scores", "lowrank_scores", "topk_select", "pack_rotate", "chunk_attention_map",
    "span_votes", "selected_attention",
)  # fmt: skip


def load_kernels() -> SimpleNamespace:
    """ltri.kernels' modules; from this repository's kernels/ when the installed ltri does not map them."""
    try:
        modules = {name: importlib.import_module(f"ltri.kernels.{name}") for name in KERNEL_MODULES}
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "ltri_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["ltri_kernels"] = package
        spec.loader.exec_module(package)
        modules = {name: importlib.import_module(f"ltri_kernels.{name}") for name in KERNEL_MODULES}
    return SimpleNamespace(**modules, package=sys.modules[modules["sparse_attention"].__package__])


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


# --------------------------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class Shape:
    """One layer's attention geometry and ltri's per-step token counts."""

    nheads: int = 32
    nheads_kv: int = 8
    headdim: int = 128
    span_len: int = 32
    n_sink: int = 64
    n_window: int = 2048
    budget: int = 2048  # tokens of retrieved spans per step
    n_select: int = 1024  # tokens kept per KV head by SparQ/Loki among the retrieved ones
    rank: int = 32  # SparQ components / Loki rank
    rope_theta: float = 500000.0

    @property
    def n_resident(self) -> int:
        return self.n_sink + self.n_select + self.n_window

    def n_spans(self, context_len: int) -> int:
        """Spans of the retrievable region [n_sink, context_len - n_window)."""
        return (context_len - self.n_sink - self.n_window) // self.span_len

    def check(self, context_len: int) -> None:
        if self.n_spans(context_len) * self.span_len < self.budget:
            raise SystemExit(f"Context {context_len} has fewer retrievable tokens than the budget {self.budget}.")
        if not self.n_select <= self.budget:
            raise SystemExit(f"n_select ({self.n_select}) must not exceed the budget ({self.budget}).")


@dataclass
class Layer:
    """One layer's cached state at one context length (batch 1)."""

    k: torch.Tensor  # (nheads_kv, seqlen, headdim) pre-RoPE keys of the context: the span payloads
    v: torch.Tensor  # (nheads_kv, seqlen, headdim)
    bounds: torch.Tensor  # (nheads_kv, 2 * headdim, n_spans) [kmax; kmin] per span, laid out for the matmul
    basis: torch.Tensor | None  # (nheads_kv, headdim, headdim) Loki basis
    k_lowrank: torch.Tensor | None  # (nheads_kv, seqlen, rank)
    k_res: torch.Tensor  # (nheads_kv, n_resident, headdim) sinks | selected | window, rotated (the unfused step's)
    v_res: torch.Tensor  # (nheads_kv, n_resident, headdim)
    k_fixed: torch.Tensor  # (nheads_kv, n_sink + n_window, headdim) sinks | window, rotated (the fused step's)
    v_fixed: torch.Tensor
    span_base: torch.Tensor  # (span_len,) int64: the first span's token rows, n_sink + 0..span_len-1
    cos: torch.Tensor  # (n_select, headdim) RoPE of the selected slots
    sin: torch.Tensor
    q_cos: torch.Tensor  # (headdim,) RoPE of the query
    q_sin: torch.Tensor


def rope_table(positions: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (len(positions), headdim) in the rotate-half layout (Llama)."""
    inv_freq = shape.rope_theta ** (-torch.arange(0, shape.headdim, 2, device=positions.device) / shape.headdim)
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x * cos + rotate_half(x) * sin; x (..., headdim), cos/sin broadcastable."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def span_bounds(k: torch.Tensor, shape: Shape, n_spans: int) -> torch.Tensor:
    """[kmax; kmin] of each span -> (nheads_kv, 2 * headdim, n_spans)."""
    region = k[:, shape.n_sink : shape.n_sink + n_spans * shape.span_len]
    spans = region.reshape(shape.nheads_kv, n_spans, shape.span_len, shape.headdim)
    bounds = torch.cat([spans.amax(dim=2), spans.amin(dim=2)], dim=-1)  # (nheads_kv, n_spans, 2 * headdim)
    return bounds.transpose(1, 2).contiguous()


def make_layer(context_len: int, shape: Shape, device, dtype, with_loki: bool, kernels, seed: int = 0) -> Layer:
    """Random keys with a common offset and decaying scales (like a model's), values, and ltri's derived state."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = torch.linspace(1.5, 0.2, shape.headdim, device=device)
    offset = torch.randn(shape.nheads_kv, 1, shape.headdim, generator=gen, device=device)
    k = torch.empty(shape.nheads_kv, context_len, shape.headdim, dtype=dtype, device=device)
    v = torch.empty_like(k)
    for start in range(0, context_len, 65536):  # in chunks: no float32 copy of a 512K context
        stop = min(start + 65536, context_len)
        noise = torch.randn(shape.nheads_kv, stop - start, shape.headdim, generator=gen, device=device)
        k[:, start:stop] = (noise * scales + offset).to(dtype)
        v[:, start:stop] = torch.randn(shape.nheads_kv, stop - start, shape.headdim, generator=gen, device=device)
    basis = k_lowrank = None
    if with_loki:
        basis = kernels.lowrank_scores.pca_basis(k[:, : min(context_len, 16384)])
        project = kernels.lowrank_scores.project_keys
        chunks = range(0, context_len, 65536)
        k_lowrank = torch.cat([project(k[:, s : s + 65536], basis, shape.rank) for s in chunks], dim=1)
    k_res = torch.empty(shape.nheads_kv, shape.n_resident, shape.headdim, dtype=dtype, device=device)
    v_res = torch.empty_like(k_res)
    k_res[:, : shape.n_sink], v_res[:, : shape.n_sink] = k[:, : shape.n_sink], v[:, : shape.n_sink]
    k_res[:, -shape.n_window :], v_res[:, -shape.n_window :] = k[:, -shape.n_window :], v[:, -shape.n_window :]
    fixed = torch.cat([torch.arange(shape.n_sink), shape.n_sink + shape.n_select + torch.arange(shape.n_window)])
    cos, sin = rope_table(shape.n_sink + torch.arange(shape.n_select, device=device), shape)
    q_cos, q_sin = rope_table(torch.tensor([shape.n_resident], device=device), shape)
    return Layer(
        k, v, span_bounds(k, shape, shape.n_spans(context_len)), basis, k_lowrank, k_res, v_res,
        k_res[:, fixed].contiguous(), v_res[:, fixed].contiguous(),
        shape.n_sink + torch.arange(shape.span_len, device=device),
        cos.to(dtype), sin.to(dtype), q_cos[0].to(dtype), q_sin[0].to(dtype),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- one decode step


def span_votes_torch(q: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The heads' vote for each span -> (n_spans,) float32. q (nheads, headdim). Five torch launches; the fused step
    runs kernels/span_votes.py's two (its reference is this)."""
    nheads_kv, two_headdim, _ = bounds.shape
    q_bound = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1).view(nheads_kv, -1, two_headdim)
    upper = torch.bmm(q_bound, bounds).float()  # (nheads_kv, group, n_spans): Quest's upper bound
    return torch.softmax(upper * (2.0 / two_headdim) ** 0.5, dim=-1).sum(dim=(0, 1))


def vote_spans(q: torch.Tensor, bounds: torch.Tensor, n_kept: int, kernels, fused: bool = True) -> torch.Tensor:
    """Top spans of the heads' vote -> (n_kept,) int64 ascending. q (nheads, headdim)."""
    votes = kernels.span_votes.span_votes(q, bounds) if fused else span_votes_torch(q, bounds)
    return kernels.topk_select.topk_tokens(votes[None], n_kept)[0]


def torch_topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """What the top-k selection kernel replaces: torch.topk, then torch.sort of the indices (stage timings)."""
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def gather_spans(layer: Layer, span_ids: torch.Tensor, shape: Shape, with_loki: bool):
    """The spans' tokens: K, V (nheads_kv, budget, headdim) and the low-rank keys (nheads_kv, budget, rank)."""
    offsets = torch.arange(shape.span_len, device=span_ids.device)
    tokens = (shape.n_sink + span_ids[:, None] * shape.span_len + offsets).flatten()  # (budget,)
    k_low = layer.k_lowrank.index_select(1, tokens) if with_loki else None
    return layer.k.index_select(1, tokens), layer.v.index_select(1, tokens), k_low


def select_tokens(q, k_cand, k_low_cand, layer: Layer, shape: Shape, selector: str, kernels) -> torch.Tensor:
    """Top n_select candidates per KV head -> (nheads_kv, n_select) int64 ascending."""
    if selector == "sparq":
        scores = kernels.sparq_scores.sparq_scores(q, k_cand, shape.rank)
    else:
        scores = kernels.lowrank_scores.lowrank_scores(q, k_low_cand, layer.basis, shape.rank)
    return kernels.topk_select.topk_tokens(scores, shape.n_select)


def place_selected(layer: Layer, k_cand, v_cand, idx: torch.Tensor, shape: Shape, rotate_keys: bool) -> None:
    """Write the selected tokens (keys rotated at their compact positions) between the sinks and the window."""
    index = idx[..., None].expand(-1, -1, shape.headdim)
    k_sel = torch.gather(k_cand, 1, index)
    slots = slice(shape.n_sink, shape.n_sink + shape.n_select)
    layer.k_res[:, slots] = rotate(k_sel, layer.cos, layer.sin) if rotate_keys else k_sel
    layer.v_res[:, slots] = torch.gather(v_cand, 1, index)


def candidate_rows(layer: Layer, span_ids: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The retrieved spans' token rows in the layer's cache -> (budget,) int64, one launch."""
    return torch.add(layer.span_base, span_ids[:, None], alpha=shape.span_len).flatten()


def token_scores(q, layer: Layer, rows: torch.Tensor, shape: Shape, selector: str, kernels) -> torch.Tensor:
    """SparQ or Loki scores of the candidate rows, read in place -> (nheads_kv, budget) float32."""
    if selector == "sparq":
        return kernels.sparq_scores.sparq_scores(q, layer.k, shape.rank, rows=rows)
    return kernels.lowrank_scores.lowrank_scores(q, layer.k_lowrank, layer.basis, shape.rank, rows=rows)


def attend_selected(q, layer: Layer, idx: torch.Tensor, candidates: torch.Tensor, kernels, select_split=None):
    """The fused attention over sinks, window and the selected candidates (idx (nheads_kv, n_select) positions in
    candidates, the rows) -> (nheads, 1, headdim); select_split: selected tokens per split (the kernel's launcher
    with it; None: the dispatch, the kernel's default)."""
    args = (q, layer.q_cos, layer.q_sin, layer.k_fixed, layer.v_fixed, layer.k, layer.v, idx, layer.cos, layer.sin)
    if select_split is None:
        return kernels.selected_attention.selected_attention(*args, candidates)[0]
    return kernels.selected_attention.selected_attention_triton(*args, candidates, select_split=select_split)[0]


def attention_inputs(q, layer: Layer, shape: Shape, selector: str, kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused step up to its attention: (idx (nheads_kv, n_select) positions in candidates, candidates (budget,)
    the retrieved spans' rows): span votes, span top-k, the candidates' rows, their scores, token top-k."""
    span_ids = vote_spans(q, layer.bounds, shape.budget // shape.span_len, kernels)
    candidates = candidate_rows(layer, span_ids, shape)
    scores = token_scores(q, layer, candidates, shape, selector, kernels)
    return kernels.topk_select.topk_tokens(scores, shape.n_select), candidates


def ltri_step(q, layer: Layer, shape: Shape, selector: str, kernels) -> torch.Tensor:
    """One decode step of one layer, fused: span votes (2 launches), span top-k, the candidates' rows, their scores
    read in place, token top-k, attention that reads the chosen candidates' rows and rotates them where they lie.
    q (nheads, headdim) pre-RoPE -> out (nheads, 1, headdim)."""
    idx, candidates = attention_inputs(q, layer, shape, selector, kernels)
    return attend_selected(q, layer, idx, candidates, kernels)


def ltri_step_unfused(q, layer: Layer, shape: Shape, selector: str, kernels, rotate_keys: bool = True):
    """The step before the fused kernels (83c3791's ltri rows): votes in torch, the candidates gathered, the selected
    ones rotated into the resident buffer, the query rotated, then the sparse attention kernel -> (nheads, 1, headdim).
    """
    span_ids = vote_spans(q, layer.bounds, shape.budget // shape.span_len, kernels, fused=False)
    k_cand, v_cand, k_low_cand = gather_spans(layer, span_ids, shape, selector == "loki")
    idx = select_tokens(q, k_cand, k_low_cand, layer, shape, selector, kernels)
    place_selected(layer, k_cand, v_cand, idx, shape, rotate_keys)
    q_rot = rotate(q, layer.q_cos, layer.q_sin) if rotate_keys else q
    out, _ = kernels.sparse_attention.sparse_attention(q_rot[:, None], layer.k_res, layer.v_res)
    return out


def step_stages(q, layer: Layer, shape: Shape, selector: str, kernels) -> dict:
    """ltri_step cut into its stages, each a call on the previous stages' outputs (computed once here), and the
    torch top-k + sort each top-k kernel replaces: name -> call, for a per-stage timing."""
    topk = kernels.topk_select.topk_tokens
    votes = kernels.span_votes.span_votes(q, layer.bounds)
    n_kept = shape.budget // shape.span_len
    span_ids = topk(votes[None], n_kept)[0]
    candidates = candidate_rows(layer, span_ids, shape)
    scores = token_scores(q, layer, candidates, shape, selector, kernels)
    idx = topk(scores, shape.n_select)
    return {
        "votes": functools.partial(kernels.span_votes.span_votes, q, layer.bounds),
        "span_topk": functools.partial(topk, votes[None], n_kept),
        "span_topk_torch": functools.partial(torch_topk_ascending, votes, n_kept),
        "candidate_rows": functools.partial(candidate_rows, layer, span_ids, shape),
        "token_scores": functools.partial(token_scores, q, layer, candidates, shape, selector, kernels),
        "token_topk": functools.partial(topk, scores, shape.n_select),
        "token_topk_torch": functools.partial(torch_topk_ascending, scores, shape.n_select),
        "attention": functools.partial(attend_selected, q, layer, idx, candidates, kernels),
    }


def unfused_step_stages(q, layer: Layer, shape: Shape, selector: str, kernels) -> dict:
    """ltri_step_unfused cut into its stages, as step_stages cuts the fused step."""
    topk = kernels.topk_select.topk_tokens
    votes = span_votes_torch(q, layer.bounds)
    n_kept = shape.budget // shape.span_len
    span_ids = topk(votes[None], n_kept)[0]
    k_cand, v_cand, k_low_cand = gather_spans(layer, span_ids, shape, selector == "loki")
    if selector == "sparq":
        score = functools.partial(kernels.sparq_scores.sparq_scores, q, k_cand, shape.rank)
    else:
        score = functools.partial(kernels.lowrank_scores.lowrank_scores, q, k_low_cand, layer.basis, shape.rank)
    scores = score()
    idx = topk(scores, shape.n_select)
    q_rot = rotate(q, layer.q_cos, layer.q_sin)[:, None]
    return {
        "votes": functools.partial(span_votes_torch, q, layer.bounds),
        "span_topk": functools.partial(topk, votes[None], n_kept),
        "gather": functools.partial(gather_spans, layer, span_ids, shape, selector == "loki"),
        "token_scores": score,
        "token_topk": functools.partial(topk, scores, shape.n_select),
        "place": functools.partial(place_selected, layer, k_cand, v_cand, idx, shape, True),
        "rotate_query": functools.partial(rotate, q, layer.q_cos, layer.q_sin),
        "attention": functools.partial(kernels.sparse_attention.sparse_attention, q_rot, layer.k_res, layer.v_res),
    }


def stage_ms(timer, stages: dict) -> dict:
    """name -> graph_ms of each stage (ms where a graph cannot hold it, or on the CPU)."""
    timings = {}
    for name, call in stages.items():
        graphed = graph_ms(timer, call)[0] if timer.device.type == "cuda" else None
        timings[name] = graphed if graphed is not None else timer(call)[0]
    return timings


def sdpa_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Torch SDPA over all keys: q (nheads, headdim), k, v (nheads_kv, seqlen, headdim) -> (nheads, 1, headdim)."""
    return F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=True)[0]


# --------------------------------------------------------------------------------------------- timing


class Timer:
    """Median device time (CUDA events behind an L2-evicting read) and host wall time of a call."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cuda = device.type == "cuda"
        # 256 MB, read by a reduction before each timed call: L2 (50 MB on an H100) then holds clean lines of it,
        # as in a decode step, where the layer's kernels before attention mostly read (weights).
        self.flush_buffer = torch.ones(64 * 2**20, dtype=torch.float32, device=device) if self.cuda else None

    def flush(self) -> None:
        self.flush_buffer.sum()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> tuple[float, float]:
        """(ms, wall_ms) medians; on a CPU both are wall time."""
        for _ in range(self.warmup):
            fn()
        walls = []
        for _ in range(self.reps):
            if self.cuda:
                self.flush()
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            walls.append(1000 * (time.perf_counter() - start))
        if not self.cuda:
            return statistics.median(walls), statistics.median(walls)
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(self.reps)]
        for start_event, end_event in events:
            self.flush()
            start_event.record()
            fn()
            end_event.record()
        self.sync()
        return statistics.median(s.elapsed_time(e) for s, e in events), statistics.median(walls)


def graph_ms(timer: Timer, fn) -> tuple[float | None, str | None]:
    """Device time of fn replayed from a CUDA graph (no launch overhead at all), or None and why it failed."""
    if not timer.cuda:
        return None, None
    try:
        side = torch.cuda.Stream(timer.device)
        side.wait_stream(torch.cuda.current_stream(timer.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and allocate outside the capture
                fn()
        torch.cuda.current_stream(timer.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timer(graph.replay)[0], None
    except Exception as error:  # noqa: BLE001 - report any capture failure in the JSON instead of stopping
        return None, f"{type(error).__name__}: {error}"


def layers_ms(timer: Timer, calls: list) -> float | None:
    """Per-call device time of calls (one per layer) replayed back to back from one CUDA graph; None on a CPU or
    when capture fails (graph_ms's error says why in the row's graph_error)."""
    if len(calls) < 2:
        return None
    total, _ = graph_ms(timer, lambda: [call() for call in calls])
    return None if total is None else total / len(calls)


def copy_gbps(device: torch.device, n_bytes: int = 1 << 30, reps: int = 10) -> float:
    """Read + write bytes per second of a large tensor .copy_ (median)."""
    source = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    timer = Timer(device, warmup=2, reps=reps)
    ms, _ = timer(lambda: target.copy_(source))
    return 2 * source.nbytes / (ms / 1000) / 1e9


# --------------------------------------------------------------------------------------------- bytes


def kv_bytes(n_tokens: int, shape: Shape, element: int) -> int:
    return 2 * shape.nheads_kv * n_tokens * shape.headdim * element


def ltri_bytes(layer: Layer, shape: Shape, selector: str, element: int) -> int:
    """What an ltri step must read: span bounds, the retrieved spans' K/V (Loki: + low-rank keys), sinks, window."""
    total = layer.bounds.numel() * element + kv_bytes(shape.budget + shape.n_sink + shape.n_window, shape, element)
    if selector == "loki":
        total += shape.nheads_kv * shape.budget * shape.rank * element
    return total


def row(
    context_len: int, method: str, timing: tuple[float, float], n_bytes: int, copy: float,
    per_layer_ms: float | None = None, **extra,
) -> dict:  # fmt: skip
    ms, wall_ms = timing
    return {
        "context_len": context_len,
        "method": method,
        "ms": ms,
        "wall_ms": wall_ms,
        "bytes": n_bytes,
        "gbps": n_bytes / (ms / 1000) / 1e9,
        "floor_ms": 1000 * n_bytes / (copy * 1e9) if copy else None,
        "layers_ms": per_layer_ms,
        "layers_gbps": n_bytes / (per_layer_ms / 1000) / 1e9 if per_layer_ms else None,
        **extra,
    }


# --------------------------------------------------------------------------------------------- runs


def measure_context(
    context_len: int, shape: Shape, methods: list[str], timer: Timer, copy: float, dtype, kernels, n_layers: int,
    select_splits=(),
):  # fmt: skip
    """Rows of every method at one context length; layers_ms over n_layers layers (on a GPU). select_splits: with
    ltri, the fused attention alone with each of these selected tokens per split (None: its default)."""
    shape.check(context_len)
    device = timer.device
    element = torch.empty((), dtype=dtype).element_size()
    with_loki = "ltri_loki" in methods
    n_made = n_layers if device.type == "cuda" else 1
    layers = [make_layer(context_len, shape, device, dtype, with_loki, kernels, seed=i) for i in range(n_made)]
    layer = layers[0]
    q = torch.randn(shape.nheads, shape.headdim, device=device).to(dtype)
    rows = []

    def measured(method: str, step, n_bytes: int, graphed: bool = True, **extra) -> dict:
        """step(layer) timed on the first layer (ms, graph_ms) and over all of them (layers_ms)."""
        graph, error = graph_ms(timer, lambda: step(layer)) if graphed else (None, None)
        per_layer = layers_ms(timer, [functools.partial(step, each) for each in layers])
        if graphed:
            extra.update(graph_ms=graph, graph_error=error)
        return row(context_len, method, timer(lambda: step(layer)), n_bytes, copy, per_layer, **extra)

    if "sdpa_full" in methods:
        rows.append(measured("sdpa_full", lambda each: sdpa_full(q, each.k, each.v), kv_bytes(context_len, shape,
                             element), graphed=False))  # fmt: skip
    steps = (
        ("ltri", "sparq", ltri_step, step_stages), ("ltri_loki", "loki", ltri_step, step_stages),
        ("ltri_unfused", "sparq", ltri_step_unfused, unfused_step_stages),
    )  # fmt: skip
    for method, selector, step_of, stages_of in steps:
        if method in methods:
            stages = stage_ms(timer, stages_of(q, layer, shape, selector, kernels))
            step = functools.partial(step_of, q, shape=shape, selector=selector, kernels=kernels)
            rows.append(measured(method, step, ltri_bytes(layer, shape, selector, element), selector=selector,
                                 stages_ms=stages))  # fmt: skip
    if "ltri" in methods and select_splits:
        inputs = {id(each): attention_inputs(q, each, shape, "sparq", kernels) for each in layers}
        for split in select_splits:
            attend = functools.partial(attend_selected, select_split=split)
            step = lambda each, attend=attend: attend(q, each, *inputs[id(each)], kernels)  # noqa: E731
            rows.append(measured(shape_label("selected_attention", split and (split,)), step,
                                 kv_bytes(shape.n_resident, shape, element), n_keys=shape.n_resident))  # fmt: skip
    if "sparse_attention_kernel" in methods:
        q_rot = rotate(q, layer.q_cos, layer.q_sin)[:, None]
        attend = kernels.sparse_attention.sparse_attention
        rows.append(measured("sparse_attention_kernel", lambda each: attend(q_rot, each.k_res, each.v_res),
                             kv_bytes(shape.n_resident, shape, element), n_keys=shape.n_resident))  # fmt: skip
        targets = {id(each): torch.empty_like(each.k_res) for each in layers}  # each layer writes its own
        copy_both = lambda each: (targets[id(each)].copy_(each.k_res), targets[id(each)].copy_(each.v_res))  # noqa: E731
        rows.append(measured("copy_same_bytes", copy_both, 2 * kv_bytes(shape.n_resident, shape, element),
                             n_keys=shape.n_resident))  # fmt: skip
    return rows


def parse_shapes(text: str, make) -> list:
    """'64x4x2,auto' -> [make(64, 4, 2), None]: launch shapes as numbers joined by x; 'auto' -> None (default)."""
    return [None if item == "auto" else make(*(int(x) for x in item.split("x"))) for item in text.split(",")]


def parse_tiles(text: str, kernels) -> list:
    """'64x4x2,128x8x3' (keys per block x warps x stages) -> Tiles with 16 packed rows; 'auto' -> None (default)."""
    return parse_shapes(text, lambda block_n, warps, stages: kernels.sparse_attention.Tiles(16, block_n, warps, stages))


def shape_label(method: str, shape) -> str:
    """method[16x64x8] for a launch shape, method for the default (None)."""
    return method if shape is None else f"{method}[{'x'.join(str(x) for x in shape)}]"


def calls_by_shape(method: str, dispatch, launcher, keyword: str, shapes) -> list[tuple[str, object]]:
    """(label, call) for each launch shape: the public dispatch for the default (None; the reference on a CPU), the
    kernel's launcher with keyword=shape otherwise."""
    return [(shape_label(method, shape), dispatch if shape is None else functools.partial(launcher, **{keyword: shape}))
            for shape in shapes]  # fmt: skip


def kernel_sweep(
    shape: Shape, timer: Timer, copy: float, dtype, kernels, key_counts, split_sizes, tiles, n_layers: int,
) -> list[dict]:  # fmt: skip
    """The sparse attention kernel alone over n_keys keys: split sizes x tiles x merge (fused in the split kernel,
    or a second launch), and SDPA on the same keys; layers_ms over n_layers key sets."""
    device = timer.device
    element = torch.empty((), dtype=dtype).element_size()
    launch = kernels.sparse_attention.sparse_attention_triton
    rows = []
    for n_keys in key_counts:
        q = torch.randn(shape.nheads, 1, shape.headdim, device=device, dtype=dtype)
        kv_sets = [torch.randn(2, shape.nheads_kv, n_keys, shape.headdim, device=device, dtype=dtype)
                   for _ in range(n_layers)]  # fmt: skip
        k, v = kv_sets[0]
        n_bytes = kv_bytes(n_keys, shape, element)
        sdpa_calls = [functools.partial(sdpa_full, q[:, 0], *kv) for kv in kv_sets]
        rows.append(row(n_keys, "sdpa", timer(sdpa_calls[0]), n_bytes, copy, layers_ms(timer, sdpa_calls),
                        n_keys=n_keys, split_size=None))  # fmt: skip
        copies = [functools.partial(torch.Tensor.copy_, torch.empty_like(kv), kv) for kv in kv_sets]
        rows.append(row(n_keys, "copy_same_bytes", timer(copies[0]), 2 * n_bytes, copy, layers_ms(timer, copies),
                        n_keys=n_keys, split_size=None))  # fmt: skip
        rows += read_rows(n_keys, kv_sets, timer, copy, n_bytes)
        for split, tile, fused in itertools.product(split_sizes, tiles, (True, False)):
            options = {"split_size": split, "tiles": tile, "fused_merge": fused}
            calls = [functools.partial(launch, q, *kv, **options) for kv in kv_sets]
            graph, error = graph_ms(timer, calls[0])
            rows.append(row(n_keys, "sparse_attention_kernel", timer(calls[0]), n_bytes, copy, layers_ms(timer, calls),
                            n_keys=n_keys, split_size=split, tiles=None if tile is None else list(tile),
                            fused_merge=fused, graph_ms=graph, graph_error=error))  # fmt: skip
    return rows


def read_rows(n_keys: int, kv_sets: list, timer: Timer, copy: float, n_bytes: int) -> list[dict]:
    """read_same_bytes[shape]: a read-only pass over the kernel's K/V bytes (``read_floor.py``) in each launch shape
    (on a CPU only the first, by its reference), per layer over the same key sets: the floor for reading them."""
    words = [kv.reshape(-1).view(torch.int32) for kv in kv_sets]
    rows = []
    for shape in read_floor.READ_SHAPES if timer.cuda else read_floor.READ_SHAPES[:1]:
        outs = [torch.empty(shape.n_programs(w.numel()), dtype=torch.int32, device=w.device) for w in words]
        calls = [functools.partial(read_floor.read_words, w, shape, out) for w, out in zip(words, outs, strict=True)]
        rows.append(row(n_keys, f"read_same_bytes[{shape.label}]", timer(calls[0]), n_bytes, copy,
                        layers_ms(timer, calls), n_keys=n_keys, split_size=None))  # fmt: skip
    return rows


def pack_rotate_rows(
    shape: Shape, timer: Timer, copy: float, dtype, kernels, launches=(None,), n_rows: int = 1 << 16
) -> list[dict]:
    """A captured decode step's packing of one layer (sinks, budget rows, window with 256 slots of headroom; keys and
    query rotated): the pack_rotate kernel (in each launch shape: PackLaunch or None, the default) against the torch
    ops it replaced (its reference), rows in device memory.
    bytes: what the kernel must read (packed K/V, cos, sin) and write (packed K/V), as copy_gbps counts both."""
    device = timer.device
    window = shape.n_window + 256
    n_packed = shape.n_sink + shape.budget + window

    def randn(*size):
        return torch.randn(*size, device=device).to(dtype)

    cos, sin = (t.to(dtype) for t in rope_table(torch.arange(n_packed, device=device), shape))
    sources = kernels.pack_rotate.StepSources(
        randn(shape.nheads, shape.headdim), torch.tensor([window - 1], device=device),
        randn(shape.nheads_kv, shape.n_sink, shape.headdim), randn(shape.nheads_kv, shape.n_sink, shape.headdim),
        randn(n_rows, 2, shape.nheads_kv, shape.headdim), torch.randint(0, n_rows, (shape.budget,), device=device),
        torch.tensor(shape.budget - 7, device=device), randn(shape.nheads_kv, 0, shape.headdim),
        randn(shape.nheads_kv, 0, shape.headdim), randn(shape.nheads_kv, window, shape.headdim),
        randn(shape.nheads_kv, window, shape.headdim), cos.contiguous(), sin.contiguous(),
    )  # fmt: skip
    element = torch.empty((), dtype=dtype).element_size()
    n_bytes = 2 * kv_bytes(n_packed, shape, element) + 2 * n_packed * shape.headdim * element
    pack = kernels.pack_rotate
    calls = calls_by_shape("pack_rotate_kernel", pack.pack_rotate, pack.pack_rotate_triton, "launch", launches)
    rows = []
    for method, call in (*calls, ("pack_rotate_torch", pack.pack_rotate_reference)):
        step = functools.partial(call, sources)
        graph, error = graph_ms(timer, step) if device.type == "cuda" else (None, None)
        rows.append(row(n_packed, method, timer(step), n_bytes, copy, n_keys=n_packed, graph_ms=graph,
                        graph_error=error))  # fmt: skip
    return rows


def chunk_map_rows(shape: Shape, timer: Timer, copy: float, dtype, kernels, chunk: int, tiles=(None,)) -> list[dict]:
    """One layer's input to span segmentation during prefill: a chunk's causal attention map among its own tokens,
    averaged over each KV head's query heads. The chunk_attention_map kernel (in each launch shape: MapTiles or
    None, the default) against its torch reference (what prefill ran before it). bytes: the rotated queries and keys
    read and the float32 map written."""
    device = timer.device
    query = torch.randn(shape.nheads, chunk, shape.headdim, device=device).to(dtype)
    keys = torch.randn(shape.nheads_kv, chunk, shape.headdim, device=device).to(dtype)
    element = torch.empty((), dtype=dtype).element_size()
    n_bytes = (shape.nheads + shape.nheads_kv) * chunk * shape.headdim * element + shape.nheads_kv * chunk * chunk * 4
    chunk_map = kernels.chunk_attention_map
    calls = calls_by_shape("chunk_map_kernel", chunk_map.chunk_attention_map, chunk_map.chunk_attention_map_triton,
                           "tiles", tiles)  # fmt: skip
    rows = []
    for method, call in (*calls, ("chunk_map_torch", chunk_map.chunk_attention_map_reference)):
        step = functools.partial(call, query, keys, shape.headdim**-0.5)
        rows.append(row(chunk, method, timer(step), n_bytes, copy, n_keys=chunk))
    return rows


def topk_cases(shape: Shape) -> list[tuple[str, int, int, int]]:
    """(name, rows, entries, k) of the step's top-k selections: span votes at TOPK_CONTEXTS, the candidates' token
    scores per KV head, and SparQ's components of each GQA group's |q|."""
    spans = [(f"span_topk_{n // 1024}k", 1, shape.n_spans(n), shape.budget // shape.span_len) for n in TOPK_CONTEXTS]
    return [*spans, ("token_topk", shape.nheads_kv, shape.budget, shape.n_select),
            ("sparq_components", shape.nheads_kv, shape.headdim, shape.rank)]  # fmt: skip


def topk_rows(shape: Shape, timer: Timer, copy: float, kernels, launches, n_layers: int) -> list[dict]:
    """The top-k selection kernel alone on each of the step's selections (topk_cases) in each launch (radix bits,
    warps; None: the default), against torch.topk + sort, on random float32 scores; layers_ms over n_layers rows.
    bytes: the scores read; matches_reference: whether the call chose what the torch reference chooses."""
    topk = kernels.topk_select
    rows = []
    for name, n_rows, n_keys, k in topk_cases(shape):
        score_sets = [torch.randn(n_rows, n_keys, device=timer.device) for _ in range(n_layers)]
        calls = [(shape_label("topk_kernel", launch),
                  functools.partial(topk.topk_tokens, k=k) if launch is None
                  else functools.partial(topk.topk_tokens_triton, k=k, radix_bits=launch[0], num_warps=launch[1]))
                 for launch in launches]  # fmt: skip
        calls.append(("topk_torch", functools.partial(torch_topk_ascending, k=k)))
        expected = topk.topk_tokens_reference(score_sets[0], k)  # random scores: no ties, one right answer
        for method, call in calls:
            per_layer = [functools.partial(call, scores) for scores in score_sets]
            graph, error = graph_ms(timer, per_layer[0])
            rows.append(row(n_keys, f"{name}:{method}", timer(per_layer[0]), 4 * n_rows * n_keys, copy,
                            layers_ms(timer, per_layer), n_keys=n_keys, graph_ms=graph, graph_error=error,
                            matches_reference=torch.equal(per_layer[0](), expected)))  # fmt: skip
    return rows


def one_launch_ms(timer: Timer) -> tuple[float, float | None]:
    """(ms, graph_ms) of one tiny kernel (a 1-element add) under the same timer: what any launch costs at least."""
    x = torch.zeros(1, device=timer.device)
    return timer(lambda: x.add_(1))[0], graph_ms(timer, lambda: x.add_(1))[0]


def check_kernels(shape: Shape, device, dtype, kernels) -> dict:
    """Largest differences of the kernels against their torch references on this device (the first GPU run)."""
    sa, sq, lr = kernels.sparse_attention, kernels.sparq_scores, kernels.lowrank_scores
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(shape.nheads, 37, shape.headdim, generator=gen, device=device).to(dtype)
    k = torch.randn(shape.nheads_kv, 3000, shape.headdim, generator=gen, device=device).to(dtype)
    v = torch.randn_like(k)
    n_valid = torch.randint(1000, 3001, (shape.nheads_kv,), generator=gen, device=device)
    checks = {}
    for name, q_in, causal in (("decode", q[:, :1], False), ("prefill_causal", q, True)):
        out, lse = sa.sparse_attention(q_in, k, v, n_valid, causal=causal)
        ref_out, ref_lse = sa.sparse_attention_reference(q_in, k, v, n_valid, causal=causal)
        checks[f"sparse_attention_{name}_out"] = (out.float() - ref_out.float()).abs().max().item()
        checks[f"sparse_attention_{name}_lse"] = (lse - ref_lse).abs().max().item()
    scores = sq.sparq_scores(q[:, 0], k, shape.rank, n_valid)
    ref = sq.sparq_scores_reference(q[:, 0], k, shape.rank, n_valid)
    checks["sparq_scores"] = (scores - ref).nan_to_num(posinf=0, neginf=0).abs().max().item()
    basis = lr.pca_basis(k)
    k_low = lr.project_keys(k, basis, shape.rank)
    scores = lr.lowrank_scores(q[:, 0], k_low, basis, shape.rank, n_valid)
    ref = lr.lowrank_scores_reference(q[:, 0], k_low, basis, shape.rank, n_valid)
    error = (scores - ref).nan_to_num(posinf=0, neginf=0).abs().max()
    checks["lowrank_scores_rel"] = (error / ref[ref.isfinite()].abs().max()).item()
    chunk_map = kernels.chunk_attention_map
    scale = shape.headdim**-0.5
    got = chunk_map.chunk_attention_map(q, k[:, :37], scale)
    ref = chunk_map.chunk_attention_map_reference(q, k[:, :37], scale)
    checks["chunk_attention_map"] = (got - ref).abs().max().item()
    return checks


def check_exact_when_everything_selected(device, dtype, kernels) -> float:
    """With every span retrieved and every token selected (no RoPE), the ltri step is full attention."""
    shape = Shape(n_sink=16, n_window=256, budget=1024, n_select=1024, rank=16)
    context_len = shape.n_sink + shape.n_window + shape.budget
    layer = make_layer(context_len, shape, device, dtype, True, kernels, seed=3)
    q = torch.randn(shape.nheads, shape.headdim, device=device).to(dtype)
    ones, zeros = torch.ones_like(layer.cos), torch.zeros_like(layer.cos)
    unrotated = replace(layer, cos=ones, sin=zeros, q_cos=ones[0], q_sin=zeros[0])  # the fused step's RoPE: none
    full = sdpa_full(q, layer.k, layer.v).float()
    errors = []
    for selector in ("sparq", "loki"):
        for out in (ltri_step(q, unrotated, shape, selector, kernels),
                    ltri_step_unfused(q, layer, shape, selector, kernels, rotate_keys=False)):  # fmt: skip
            errors.append((out.float() - full).abs().max().item())
    return max(errors)


# --------------------------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict:
    try:
        triton_version = importlib.import_module("triton").__version__
    except ImportError:
        triton_version = None
    from ltri.provenance import git_sha

    sha = git_sha()
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device) if device.type == "cuda" else platform.processor() or "cpu",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": sha,
        "command": " ".join(sys.argv),
    }


def print_rows(rows: list[dict], copy: float) -> None:
    columns = ("ms", "graph ms", "layer ms", "wall ms", "MB read")
    print(f"{'context':>8} {'method':>44} " + " ".join(f"{c:>9}" for c in columns) + f" {'GB/s':>8} {'% copy':>7}"
          f" {'layer %':>7}")  # fmt: skip
    for r in rows:
        share, layer_share = (f"{100 * r[key] / copy:6.1f}%" if copy and r.get(key) else "      -"
                              for key in ("gbps", "layers_gbps"))  # fmt: skip
        label = r["method"] + (f"[{r['split_size']}]" if r.get("split_size") else "")
        if r.get("tiles"):
            label += "[{}x{}x{}]".format(*r["tiles"][1:])
        if r.get("fused_merge") is False:
            label += "[2 launches]"
        graph, per_layer = (
            f"{r[key]:9.4f}" if r.get(key) is not None else f"{'-':>9}" for key in ("graph_ms", "layers_ms")
        )
        print(
            f"{r['context_len']:>8} {label:>44} {r['ms']:9.4f} {graph} {per_layer} {r['wall_ms']:9.4f} "
            f"{r['bytes'] / 1e6:9.2f} {r['gbps']:8.1f} {share} {layer_share}"
        )
        if r.get("stages_ms"):
            print(f"{'':>8} {'stages (graph ms):':>44} " + ", ".join(f"{k} {v:.4f}" for k, v in r["stages_ms"].items()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="16k,64k,128k,256k,512k")
    parser.add_argument("--methods", default="sdpa_full,ltri,ltri_loki,ltri_unfused,sparse_attention_kernel")
    parser.add_argument("--budget", type=int, default=2048, help="tokens of retrieved spans per step")
    parser.add_argument("--select", type=int, default=1024, help="tokens kept per KV head by SparQ/Loki")
    parser.add_argument("--rank", type=int, default=32, help="SparQ components / Loki rank")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--sweep-keys", default="3136,16k", help="kernel_sweep key counts ('' to skip)")
    parser.add_argument("--sweep-splits", default="auto,128,256,512")
    parser.add_argument(
        "--sweep-tiles",
        default=SWEEP_TILES,
        help="kernel_sweep launch shapes: keys per block x warps x stages, or auto (the default's)",
    )
    parser.add_argument("--chunk", type=int, default=2048, help="chunk_attention_map rows' chunk (0: none)")
    parser.add_argument("--sweep-pack", default=SWEEP_PACK, help="pack_rotate launch shapes: places x warps")
    parser.add_argument(
        "--sweep-chunk-map",
        default=SWEEP_CHUNK_MAP,
        help="chunk_attention_map launch shapes: rows per head x keys per step x warps",
    )
    parser.add_argument(
        "--sweep-select-splits", default="auto,128,256", help="with ltri: the fused attention alone at these selected "
        "tokens per split (auto: its default; '' to skip)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-topk", default=SWEEP_TOPK, help="top-k launches: radix bits x warps, or auto; '' to skip"
    )
    parser.add_argument("--layers", type=int, default=8, help="layers replayed back to back for layers_ms (GPU)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT}; none in --smoke)")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, torch references, small sizes")
    return parser.parse_args()


def smoke_settings(args: argparse.Namespace, shape: Shape) -> tuple[Shape, list[int]]:
    """Small sizes for a CPU run of the whole script."""
    shape = replace(shape, n_sink=16, n_window=256, budget=512, n_select=256, rank=16)
    args.warmup, args.reps, args.sweep_keys, args.chunk = 1, 2, "", min(args.chunk, 256)
    # launch shapes are the kernels': on the CPU the references run
    args.sweep_pack = args.sweep_chunk_map = args.sweep_topk = args.sweep_select_splits = "auto"
    return shape, [shape.n_sink + shape.n_window + 1024, shape.n_sink + shape.n_window + 4096]


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("This benchmark needs a CUDA GPU; --smoke runs its logic on the CPU with the torch references.")
    kernels = load_kernels()
    shape = Shape(n_sink=args.sink, n_window=args.window, budget=args.budget, n_select=args.select, rank=args.rank)
    contexts = [parse_length(x) for x in args.contexts.split(",")]
    if args.smoke:
        shape, contexts = smoke_settings(args, shape)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if device.type == "cuda" and not kernels.package.use_triton(torch.empty(1, device=device)):
        sys.exit("Triton is not installed: the kernels would fall back to the torch references.")
    methods = args.methods.split(",")

    copy = copy_gbps(device, n_bytes=1 << 30 if device.type == "cuda" else 1 << 26)
    print(f"copy bandwidth {copy:.1f} GB/s on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    checks = check_kernels(shape, device, dtype, kernels)
    checks["ltri_step_vs_full_when_everything_selected"] = check_exact_when_everything_selected(device, dtype, kernels)
    print("kernel checks (max abs difference against the references):", json.dumps(checks))

    timer = Timer(device, args.warmup, args.reps)
    launch_ms, launch_graph_ms = one_launch_ms(timer) if device.type == "cuda" else (None, None)
    print(f"one launch of a 1-element kernel: {launch_ms} ms, {launch_graph_ms} ms from a graph")
    rows = []
    select_splits = parse_shapes(args.sweep_select_splits, int) if args.sweep_select_splits else ()
    for context_len in contexts:
        rows += measure_context(context_len, shape, methods, timer, copy, dtype, kernels, args.layers, select_splits)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the layer of this context is gone
    print_rows(rows, copy)
    launches = parse_shapes(args.sweep_pack, kernels.pack_rotate.PackLaunch)
    packing = pack_rotate_rows(shape, timer, copy, dtype, kernels, launches)
    print("packing a captured step's key set (context = packed keys):")
    print_rows(packing, copy)
    map_tiles = parse_shapes(args.sweep_chunk_map, kernels.chunk_attention_map.MapTiles)
    chunk_map = chunk_map_rows(shape, timer, copy, dtype, kernels, args.chunk, map_tiles) if args.chunk else []
    if chunk_map:
        print("a prefill chunk's attention map for span segmentation (context = chunk tokens):")
        print_rows(chunk_map, copy)
    topk = []
    if args.sweep_topk:
        launches = parse_shapes(args.sweep_topk, lambda *launch: launch)
        topk = topk_rows(shape, timer, copy, kernels, launches, args.layers)
        print("top-k selection (context = entries a row):")
        print_rows(topk, copy)
        wrong = [r["method"] for r in topk if not r["matches_reference"]]
        print("top-k calls that chose other entries than the reference:", ", ".join(wrong) or "none")
    sweep = []
    if args.sweep_keys:
        keys = [parse_length(x) for x in args.sweep_keys.split(",")]
        splits = [None if s == "auto" else int(s) for s in args.sweep_splits.split(",")]
        tiles = parse_tiles(args.sweep_tiles, kernels)
        sweep = kernel_sweep(shape, timer, copy, dtype, kernels, keys, splits, tiles, args.layers)
        print("kernel sweep (context = keys):")
        print_rows(sweep, copy)

    result = {
        "env": environment(device),
        "config": {
            **asdict(shape),
            "dtype": str(dtype),
            "warmup": args.warmup,
            "reps": args.reps,
            "l2_flush": "read",
            "layers": args.layers,
        },
        "copy_gbps": copy,
        "one_launch_ms": launch_ms,
        "one_launch_graph_ms": launch_graph_ms,
        "checks": checks,
        "rows": rows,
        "kernel_sweep": sweep,
        "pack_rotate": packing,
        "chunk_attention_map": chunk_map,
        "topk": topk,
    }
    out = args.out if args.out or args.smoke else DEFAULT_OUT
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
