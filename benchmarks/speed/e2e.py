"""End-to-end speed of a Llama-3-8B-shaped model: full attention (transformers) against the ltri Session.

    python3 benchmarks/speed/e2e.py --contexts 32k,128k --out benchmarks/speed/results/e2e_h100.json
    python3 benchmarks/speed/e2e.py --contexts 256k --only-methods ltri --profile
    python3 benchmarks/speed/e2e.py --tiny --device cpu --contexts 2k --decode-tokens 4 --ltri-window 256 \
        --store-root /tmp --out /tmp/e2e.json                        # smoke test on a CPU

Model: LlamaConfig with Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 query heads,
8 KV heads, head dim 128, vocab 128256, rope_theta 500000) and random weights (normal, std 0.02; norms 1),
built on the meta device and filled on the target device, bf16 on CUDA. Speed does not depend on the weight
values. The context is seeded random token ids. Methods, per context length:

- ``full``: what users have today. Transformers' own sdpa attention and DynamicCache, chunked prefill
  (--full-chunk tokens per forward, logits of the last position only), then greedy decode one token at a time.
- ``ltri``: the Session with its default config (policy ``ltri``) except --ltri-* overrides; the span store in
  a new directory under --store-root (default /dev/shm), removed after the row; where ltri keeps host rows
  (on CUDA by default) they are the payloads' only copy and the store stays empty. Prefill with
  ``Session.prefill`` (raw token ids, in chunks of ``LtriConfig.prefill_chunk``), then greedy decode as
  ``Session`` does it: the next token from the last logits, fed back through ``Session.prefill([token])`` (the
  same one-token forward as the session's own decode loop, without detokenizing).

Each row: prefill tokens/s and seconds, decode tokens/s and ms per token (mean, median, first step), peak GPU
memory (``torch.cuda.max_memory_allocated``, reset per row: weights included), resident tokens and their KV
bytes, and the decode floor: the bytes one decode step must read (weights except the embedding table, plus the
resident KV of every layer) divided by the copy bandwidth measured in the same run. ltri rows add the span
count, the store's payload and on-disk size, the file system it lives on, the index size, the span cache's
hits and misses during decode, how the decode steps went through the captured step (bound, replayed, eager,
declined) and what made it bind anew, with the row cache (on unless --ltri-no-row-cache) the retrieved rows found
in it and all retrieved rows (``decode_row_cache_hits``, over every captured step; rows of results before 2026-12-07
count since the last bind; with a token selector each KV head's selected rows, a row counted once a head; with a
selector also the candidates whose keys (SparQ) or projections (Loki) were found in their cache,
``decode_candidate_cache_hits``), and per step: its time, the
process's CPU time (every thread), page faults and garbage collection time (``decode_*_steps``). status: ``ok``;
``oom`` (torch.OutOfMemoryError, memory freed, the run goes on); ``no_space`` (the store root has less free space
than the spans need: not attempted);
``store_error`` (ltri refused, e.g. the store filled up); ``cut_off`` (an earlier command ended during this row).

The results file is append-only and resumable: every row is written as soon as it ends (and marked ``started``
before), rows already there are skipped (--redo measures them again), and each command is recorded under
``runs`` with its environment (command, git SHA, GPU, versions) and measured copy bandwidth. So a long sweep can
be split over commands of a few minutes each with --contexts and --only-methods; rows measured into another file
with the same settings (another device call) join this one with --merge (they keep the run that measured them).
The settings (shape, dtype, decode tokens, chunking, ltri config, seed) must match the file's, else the script
refuses; ``full`` rows alone may come from a file with another ltri config, which they do not read.

--profile: after the timed ltri decode, --profile-steps more steps under torch.profiler (ops by self device
and CPU time, and ltri's phases: resident set, retrieval, span loading, store reads, index search, attention,
append, labelled for the profile only) and again under cProfile (Python functions by cumulative and own time),
written to ``<out stem>_profile_<context>.txt`` next to the JSON; then --profile-steps more prefill chunks
under torch.profiler (segmentation, index vectors, eviction, store writes, index adds, attention), again under
cProfile, written to ``<out stem>_prefill_profile_<context>.txt``. Both files end with a census of the host's
waits for the device (CUDA's sync debug mode) over --profile-steps more steps or chunks. The device's copy of
the tree has no .git: pass GIT_SHA=$(git rev-parse HEAD).

--profile-start N: after the row (the timed Session closed), a fresh Session reads the context's first N tokens,
then N more, each half under its own cProfile with every chunk's seconds (synchronized): where the start of a
prefill loses time that later chunks do not (NOTES.md step 22), written to ``<out stem>_start_profile_<context>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import gc
import io
import json
import os
import platform
import pstats
import resource
import shlex
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from ltri import LtriConfig, LtriError, SamplingConfig, Session
from ltri.cache import cache_argument_name
from ltri.config import SELECTORS
from ltri.index import INDEX_BACKENDS
from ltri.model import DTYPES, resolve_dtype
from ltri.offload import host_payloads
from ltri.provenance import git_dirty, git_sha
from ltri.sampling import sample_next
from ltri.timing import copy_bandwidth, synchronize

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "speed" / "results" / "e2e_h100.json"
METHODS = ("full", "ltri")
FINAL_STATUSES = ("ok", "oom", "no_space", "store_error", "cut_off")
GREEDY = SamplingConfig(temperature=0.0)
# Warm-up context of ltri (and full): with spans of about 15 tokens, 16K tokens store more spans per layer than one
# 1024-entry chunk of ltri.topk, whose two-round path (and its kernels) a 1,600-token warm-up never reached.
WARM_UP_TOKENS = 16384
STORE_SPACE_MARGIN = 1.15  # LMDB pages and records on top of the raw payload bytes (an estimate)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ModelShape:
    """A Llama decoder's geometry."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    max_positions: int = 1 << 20

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys and values of one token, all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype.itemsize

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,
        )


LLAMA3_8B = ModelShape(4096, 14336, 32, 32, 8, 128, 128256, 500000.0)
TINY = ModelShape(64, 128, 2, 4, 2, 16, 512, 10000.0)


@dataclass(frozen=True)
class Settings:
    shape_name: str  # "llama3-8b" or "tiny"
    shape: ModelShape
    contexts: tuple[int, ...]
    methods: tuple[str, ...]
    decode_tokens: int
    full_chunk: int
    ltri: LtriConfig
    store_root: Path
    device: str
    dtype: str
    seed: int
    out: Path
    profile: bool
    profile_steps: int
    redo: bool
    warmup: bool = True
    merge: Path | None = None  # a results file whose rows to take instead of measuring
    host_register_threads: int = 1  # background threads registering host-row pieces (host_payloads)
    host_prefault: str = "steps"  # how host-row pieces are faulted in before they register (host_payloads.PREFAULT)
    profile_start: int = 0  # tokens of a fresh Session's start profiled after the row (0: none)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise SystemExit(f"Unknown methods {sorted(unknown)}: choose among {', '.join(METHODS)}.")
        if not self.contexts or min(self.contexts) < 1:
            raise SystemExit("Give at least one context length of 1 token or more.")
        if self.decode_tokens < 1 or self.full_chunk < 1 or self.profile_steps < 1:
            raise SystemExit("--decode-tokens, --full-chunk and --profile-steps must be at least 1.")
        if self.profile_start < 0 or 2 * self.profile_start > min(self.contexts):
            raise SystemExit("--profile-start must be between 0 and half the shortest context.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def fingerprint(self) -> dict:
        """What must match between the commands that fill one results file."""
        return {
            "model": self.shape_name,
            "shape": asdict(self.shape),
            "dtype": self.dtype,
            "decode_tokens": self.decode_tokens,
            "full_chunk": self.full_chunk,
            "ltri_config": json.loads(json.dumps(asdict(replace(self.ltri, device=None)))),
            "seed": self.seed,
            **({} if self.host_prefault == "steps" else {"host_prefault": self.host_prefault}),  # the default: absent
            **({} if self.host_register_threads == 1 else {"host_register_threads": self.host_register_threads}),
        }


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="32k,128k,256k,512k")
    parser.add_argument("--only-methods", default=",".join(METHODS), help="full,ltri")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--full-chunk", type=int, default=8192, help="tokens per prefill forward of full")
    parser.add_argument("--ltri-chunk", type=int, default=None, help="Session chunk_size (default: ltri's)")
    parser.add_argument("--ltri-window", type=int, default=None, help="n_window (default: ltri's)")
    parser.add_argument("--ltri-sink", type=int, default=None, help="n_sink (default: ltri's)")
    parser.add_argument(
        "--ltri-refresh-every", type=int, default=None, help="decode steps per retrieval (default: ltri's)"
    )
    parser.add_argument(
        "--ltri-backend", default=None, choices=INDEX_BACKENDS, help="span index (default: ltri's, torch on CUDA)"
    )
    parser.add_argument("--ltri-budget", type=int, default=None, help="retrieved tokens a step (default: ltri's)")
    parser.add_argument(
        "--ltri-selector", default=None, choices=SELECTORS, help="token selection per KV head (default: ltri's)"
    )
    parser.add_argument(
        "--ltri-select-tokens", type=int, default=None, help="tokens each KV head keeps (default: ltri's)"
    )
    parser.add_argument(
        "--ltri-no-graphs", action="store_true", help="decode steps without CUDA graphs (LtriConfig.cuda_graphs off)"
    )
    parser.add_argument(
        "--ltri-no-dense-kernels",
        action="store_true",
        help="LtriConfig.dense_kernels off: the decode step's norms, MLP activation and projections (each its own "
        "matmul) as transformers' modules",
    )
    parser.add_argument(
        "--ltri-no-row-cache", action="store_true", help="MemoryConfig.row_cache off: every retrieved row over PCIe"
    )
    parser.add_argument(
        "--ltri-host-payloads",
        default=None,
        choices=("cuda", "always", "never"),
        help="MemoryConfig.host_payloads (default: ltri's); never: decode steps read spans through the span cache",
    )
    parser.add_argument("--store-root", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama shape (2 layers, hidden 64) for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", action="store_true", help="profile a few ltri decode steps per context")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--redo", action="store_true", help="measure rows that the results file already holds")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="measure nothing: take the --contexts x --only-methods rows of this results file (same settings, e.g. "
        "from another device call) into --out, with the runs that measured them",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up rows (smoke tests)")
    parser.add_argument(
        "--host-prefault",
        default="steps",
        choices=("steps", "piece", "none"),
        help="how host-row pieces are faulted in before they register: 2 MB a call (ltri's), a piece a call, or "
        "not (cudaHostRegister does it; the A/B of NOTES.md step 17)",
    )
    parser.add_argument(
        "--host-register-threads",
        type=int,
        default=1,
        help="background threads that fault in and register host-row pieces (ltri's: 1; NOTES.md step 20)",
    )
    parser.add_argument(
        "--profile-start",
        type=parse_length,
        default=0,
        help="tokens (e.g. 8k) of a fresh Session's prefill profiled after each ltri row, then as many more: where "
        "the start loses time",
    )
    args = parser.parse_args(argv)
    if args.host_register_threads < 1:
        raise SystemExit("--host-register-threads must be at least 1.")
    device = torch.device(args.device)
    return Settings(
        shape_name="tiny" if args.tiny else "llama3-8b",
        shape=TINY if args.tiny else LLAMA3_8B,
        contexts=tuple(parse_length(x) for x in args.contexts.split(",") if x.strip()),
        methods=tuple(x.strip() for x in args.only_methods.split(",") if x.strip()),
        decode_tokens=args.decode_tokens,
        full_chunk=args.full_chunk,
        ltri=ltri_config(args, device),
        store_root=args.store_root,
        device=str(device),
        dtype=args.dtype or str(resolve_dtype(None, device)).removeprefix("torch."),
        seed=args.seed,
        out=args.out,
        profile=args.profile,
        profile_steps=args.profile_steps,
        redo=args.redo,
        warmup=not args.no_warmup,
        merge=args.merge,
        host_prefault=args.host_prefault,
        host_register_threads=args.host_register_threads,
        profile_start=args.profile_start,
    )


def ltri_config(args, device: torch.device) -> LtriConfig:
    """ltri's default config, except the device and the --ltri-* overrides."""
    config = LtriConfig(device=str(device))
    memory = config.memory
    if args.ltri_window is not None:
        memory = replace(memory, n_window=args.ltri_window)
    if args.ltri_sink is not None:
        memory = replace(memory, n_sink=args.ltri_sink)
    if args.ltri_host_payloads is not None:
        memory = replace(memory, host_payloads=args.ltri_host_payloads)
    if args.ltri_no_row_cache:
        memory = replace(memory, row_cache=False)
    retrieval = config.retrieval
    overrides = {
        "refresh_every": args.ltri_refresh_every, "budget": args.ltri_budget, "selector": args.ltri_selector,
        "select_tokens": args.ltri_select_tokens, "backend": args.ltri_backend,
    }  # fmt: skip
    retrieval = replace(retrieval, **{name: value for name, value in overrides.items() if value is not None})
    chunk = config.prefill_chunk(device) if args.ltri_chunk is None else args.ltri_chunk
    return replace(
        config, memory=memory, retrieval=retrieval, chunk_size=chunk, cuda_graphs=not args.ltri_no_graphs,
        dense_kernels=not args.ltri_no_dense_kernels,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- model


def build_model(shape: ModelShape, device: torch.device, dtype: torch.dtype, seed: int):
    """A random LlamaForCausalLM of this shape on device: built on the meta device, then filled there."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.llama_config())
    model = model.to(dtype=dtype).to_empty(device=device)
    fill_random_(model, seed)
    rebuild_rotary(model, device)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    leftovers = [name for name, t in tensors if t.is_meta or t.device.type != device.type]
    if leftovers:
        raise RuntimeError(f"{len(leftovers)} tensors not materialised on {device}, e.g. {leftovers[0]}")
    model.set_attn_implementation("sdpa")
    return model.eval()


@torch.no_grad()
def fill_random_(model, seed: int, std: float = 0.02) -> None:
    """Weights ~ N(0, std), RMSNorm weights 1 (as at initialisation)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.fill_(1.0)
        else:
            parameter.normal_(0.0, std, generator=generator)


def rebuild_rotary(model, device: torch.device) -> None:
    """to_empty leaves the rotary embedding's inv_freq buffers uninitialised: make the module again on device."""
    decoder = model.get_decoder()
    with torch.device(device):
        decoder.rotary_emb = type(decoder.rotary_emb)(model.config)


def weight_bytes_read(model) -> int:
    """Parameter bytes a decode step reads: all of them but the embedding table, of which one row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    return total - embedding.numel() * embedding.element_size() + embedding.shape[1] * embedding.element_size()


class TokenIdsOnly:
    """Stands in for a tokenizer: this benchmark feeds token ids (Session.prefill), never text.

    Session reads only what a plain-text chat format, the stop tokens and the store's fingerprint need:
    no chat template, no EOS, an empty vocabulary. Anything that would tokenize text fails loudly.
    """

    chat_template = None
    eos_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return {}

    def __call__(self, *args, **kwargs):
        raise TypeError("the e2e benchmark feeds token ids only: no text goes through this tokenizer")


def context_ids(n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    """Seeded random token ids (n_tokens,) on the CPU; the same for every method."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + n_tokens)
    return torch.randint(0, vocab, (n_tokens,), generator=generator)


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Progress:
    """Where a row is (for the oom report), with a prefill progress line every eighth of the context.

    checkpoint(fields): called with the progress so far at each line, so that a row cut off by the command's
    time limit still says how far it got.
    """

    label: str
    checkpoint: Callable[[dict], None] | None = None
    phase: str = "setup"
    tokens_done: int = 0
    started: float = field(default_factory=time.perf_counter)
    next_report: float = 0.125
    marks: list[tuple[int, float]] = field(default_factory=list)  # (tokens done, seconds) at each line

    def prefill(self, done: int, total: int) -> None:
        self.phase, self.tokens_done = "prefill", done
        if done < self.next_report * total:
            return
        elapsed = time.perf_counter() - self.started
        print(f"  {self.label}: prefill {done}/{total} tokens, {done / elapsed:.0f} tok/s", flush=True)
        self.marks.append((done, elapsed))
        while self.next_report * total <= done:
            self.next_report += 0.125
        if self.checkpoint is not None:
            self.checkpoint({"tokens_done": done, "prefill_s_so_far": elapsed, "prefill_tok_s_so_far": done / elapsed})


def timed_prefill(forward, ids: torch.Tensor, chunk: int, progress: Progress) -> tuple[float, torch.Tensor]:
    """forward(chunk ids) -> logits of its last position. Returns (seconds, last logits)."""
    synchronize(ids.device)
    progress.started = start = time.perf_counter()
    logits = None
    for offset in range(0, ids.numel(), chunk):
        logits = forward(ids[offset : offset + chunk])
        progress.prefill(min(offset + chunk, ids.numel()), ids.numel())
    synchronize(ids.device)
    return time.perf_counter() - start, logits


def timed_decode(
    step, logits: torch.Tensor, n_tokens: int, device: torch.device, progress: Progress, host: HostWatch | None = None
):
    """Greedy decode: step([token]) -> logits (vocab,). Returns (each step's seconds, argmax included; last logits).
    host: watches each step's host side too."""
    progress.phase = "decode"
    times = []
    for _ in range(n_tokens):
        synchronize(device)
        if host is not None:
            host.begin()
        start = time.perf_counter()
        logits = step([sample_next(logits, GREEDY, None)])
        synchronize(device)
        times.append(time.perf_counter() - start)
        if host is not None:
            host.end()
    return times, logits


class HostWatch:
    """Per decode step, what the host did besides waiting: the process's CPU time (user + system, every thread),
    its page faults, and the time Python's garbage collector ran. A step much longer than its GPU work with little
    CPU time waited on something else."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = {"cpu_ms": [], "page_faults": [], "gc_ms": []}
        self._gc_s = 0.0
        self._gc_started: float | None = None
        self._at_begin = (0.0, 0, 0.0)
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_s += time.perf_counter() - self._gc_started
            self._gc_started = None

    def _sample(self) -> tuple[float, int, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, usage.ru_minflt + usage.ru_majflt, self._gc_s

    def begin(self) -> None:
        self._at_begin = self._sample()

    def end(self) -> None:
        (cpu, faults, gc_s), (cpu0, faults0, gc0) = self._sample(), self._at_begin
        self.steps["cpu_ms"].append(round(1000 * (cpu - cpu0), 2))
        self.steps["page_faults"].append(faults - faults0)
        self.steps["gc_ms"].append(round(1000 * (gc_s - gc0), 2))

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def speed_fields(n_tokens: int, prefill_s: float, step_s: list[float]) -> dict:
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": n_tokens / prefill_s,
        "decode_tokens": len(step_s),
        "decode_tok_s": len(step_s) / sum(step_s),
        "decode_ms_per_token": 1000 * sum(step_s) / len(step_s),
        "decode_ms_median": 1000 * statistics.median(step_s),
        "decode_ms_first": 1000 * step_s[0],
        "decode_ms_max": 1000 * max(step_s),
        "decode_ms_steps": [round(1000 * seconds, 2) for seconds in step_s],
    }


# --------------------------------------------------------------------------------------------- methods


@torch.inference_mode()
def run_full(model, ids: torch.Tensor, settings: Settings, progress: Progress) -> dict:
    """Transformers' sdpa attention and DynamicCache: chunked prefill, then greedy decode."""
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    cache = DynamicCache()
    cache_kwarg = {cache_argument_name(model): cache}

    def forward(chunk: torch.Tensor) -> torch.Tensor:
        output = model(input_ids=chunk[None], use_cache=True, logits_to_keep=1, **cache_kwarg)
        return output.logits[0, -1].float()

    prefill_s, logits = timed_prefill(forward, ids, settings.full_chunk, progress)

    def step(token: list[int]) -> torch.Tensor:
        return forward(torch.tensor(token, device=ids.device))

    step_s, _ = timed_decode(step, logits, settings.decode_tokens, ids.device, progress)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    speed = speed_fields(ids.numel(), prefill_s, step_s)
    return {**speed, "resident_tokens": cache.get_seq_length(), "resident_kv_bytes": kv_bytes}


def run_ltri(model, ids: torch.Tensor, settings: Settings, progress: Progress) -> dict:
    """The ltri Session: prefill of the ids, then greedy decode through Session.prefill([token])."""
    # process-wide host-row tuning, not LtriConfig: MemoryConfig's fields decide whether a saved store reopens
    host_payloads.PREFAULT = settings.host_prefault
    host_payloads.REGISTRATION_THREADS = settings.host_register_threads
    space = store_space(settings, ids.numel())
    if not keeps_host_rows(settings) and space["store_free_gb"] < space["store_needed_gb"]:
        return {"status": "no_space", **space}
    store = settings.store_root / f"ltri-e2e-{os.getpid()}-{ids.numel()}"
    session = None
    try:
        session = Session(model, settings.ltri, tokenizer=TokenIdsOnly(), store=store)
        fields, logits = measure_session(session, ids, settings, progress)
        fields.update(store_gb=store_bytes(store) / 1e9, **space)
        if settings.profile:
            fields["profile_file"] = profile_decode(session, logits, ids.numel(), settings).name
            fields["prefill_profile_file"] = profile_prefill(session, ids.numel(), settings).name
    finally:
        if session is not None:
            session.close()
        shutil.rmtree(store, ignore_errors=True)
    if settings.profile_start:
        fields["start_profile_file"] = profile_start(model, ids, settings).name
    return fields


def profile_start(model, ids: torch.Tensor, settings: Settings) -> Path:
    """A fresh Session reads ids' first settings.profile_start tokens, then as many more, each half under its own
    cProfile with each chunk's seconds; returns the file (``<out stem>_start_profile_<context>.txt``)."""
    n_start, chunk = settings.profile_start, settings.ltri.chunk_size
    store = settings.store_root / f"ltri-e2e-start-{os.getpid()}-{ids.numel()}"
    session = Session(model, settings.ltri, tokenizer=TokenIdsOnly(), store=store)
    halves = []
    try:
        for first in (0, n_start):
            python_profile, chunk_s = cProfile.Profile(), []
            for offset in range(first, first + n_start, chunk):
                synchronize(session.device)
                python_profile.enable()
                start = time.perf_counter()
                session.prefill(ids[offset : min(offset + chunk, first + n_start)])
                synchronize(session.device)
                chunk_s.append(time.perf_counter() - start)
                python_profile.disable()
            halves.append((first, chunk_s, python_profile))
    finally:
        session.close()
        shutil.rmtree(store, ignore_errors=True)
    path = settings.out.with_name(f"{settings.out.stem}_start_profile_{ids.numel()}.txt")
    parts = [
        f"ltri prefill start profile: {settings.shape_name}, a fresh Session reads tokens 0-{n_start} of the "
        f"{ids.numel()}-token context, then {n_start}-{2 * n_start}, in chunks of {chunk}, each half under its own "
        "cProfile (each chunk synchronized, so the chunks' seconds include the device's work).\n"
    ]
    for first, chunk_s, python_profile in halves:
        seconds = ", ".join(f"{x:.3f}" for x in chunk_s)
        parts.append(
            f"\n==== tokens {first}-{first + n_start}: {sum(chunk_s):.3f} s, "
            f"{n_start / sum(chunk_s):.0f} tokens/s; chunk seconds: {seconds} ====\n"
        )
        parts.append(python_tables(python_profile))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path


def slice_rates(marks: list[tuple[int, float]]) -> list[dict]:
    """Each stretch of a prefill between two progress marks (tokens done, seconds since its start): its own
    tokens/s, where the printed rate is the average since the start (benchmarks/speed/NOTES.md step 17)."""
    rows, (tokens_before, seconds_before) = [], (0, 0.0)
    for tokens, seconds in marks:
        rows.append(
            {"from": tokens_before, "to": tokens, "tok_s": (tokens - tokens_before) / (seconds - seconds_before)}
        )
        tokens_before, seconds_before = tokens, seconds
    return rows


def measure_session(session: Session, ids: torch.Tensor, settings: Settings, progress: Progress):
    """Timed prefill and decode. Returns (row fields, logits of the last decode step)."""
    device = session.device
    synchronize(device)
    progress.started = start = time.perf_counter()
    logits = session.prefill(ids, progress=progress.prefill)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    hits, misses = span_cache_counts(session)
    captured_before = captured_counts(session)
    host = HostWatch()
    try:
        step_s, logits = timed_decode(session.prefill, logits, settings.decode_tokens, device, progress, host)
    finally:
        host.close()
    hits_after, misses_after = span_cache_counts(session)
    captured_after = captured_counts(session)
    stats = session.stats()
    fields = {
        **speed_fields(ids.numel(), prefill_s, step_s),
        "resident_tokens": stats.resident_tokens,
        "resident_kv_bytes": stats.resident_tokens * settings.shape.kv_bytes_per_token(session.dtype),
        "device_kv_bytes": stats.memory_bytes,  # sinks, windows and span caches of all layers
        "spans": stats.spans,
        "store_payload_gb": stats.store_bytes / 1e9,
        "index_gb": index_bytes(session) / 1e9,
        "decode_span_cache_hits": hits_after - hits,
        "decode_span_cache_misses": misses_after - misses,
        "decode_captured_steps": counts_since(captured_before["steps"], captured_after["steps"]),
        "decode_rebinds": counts_since(captured_before["rebinds"], captured_after["rebinds"]),
        "decode_row_cache_hits": row_cache_hits(session),
        "decode_candidate_cache_hits": row_cache_hits(session, "candidate_cache"),
        **{f"decode_{name}_steps": values for name, values in host.steps.items()},
        "host_payloads_gb": host_payload_bytes(session) / 1e9,
        "host_payloads": settings.ltri.memory.host_payloads,
        "host_prefault": settings.host_prefault,
        "host_register_threads": settings.host_register_threads,
        "ltri_chunk": settings.ltri.chunk_size,
        "n_sink": settings.ltri.memory.n_sink,
        "n_window": settings.ltri.memory.n_window,
        "budget": settings.ltri.retrieval.budget,
        "refresh_every": settings.ltri.retrieval.refresh_every,
        "selector": settings.ltri.retrieval.selector,
        "select_tokens": settings.ltri.retrieval.select_tokens,
    }
    return fields, logits


def span_cache_counts(session: Session) -> tuple[int, int]:
    caches = [getattr(memory, "cache", None) for memory in session.cache.memories()]
    caches = [cache for cache in caches if cache is not None]
    return sum(cache.hits for cache in caches), sum(cache.misses for cache in caches)


def captured_counts(session: Session) -> dict[str, dict[str, int]]:
    """The session's ltri.captured_decode counters so far: ``steps`` (how decode steps went: bound, replayed, eager,
    declined) and ``rebinds`` (what made a captured step bind anew)."""
    captured = session._captured
    return {name: {} if captured is None else dict(getattr(captured, name)) for name in ("steps", "rebinds")}


def row_cache_hits(session: Session, kind: str = "row_cache") -> list[int] | None:
    """[rows found in the layers' row caches of this kind, rows read] over the session's captured steps
    (``CapturedDecode.cache_hits``); None without such caches."""
    return None if session._captured is None else session._captured.cache_hits(kind)


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: count - before.get(key, 0) for key, count in after.items()}


def host_payload_bytes(session: Session) -> int:
    """Host rows' bytes in use (SpanMemory.host_row_bytes; memories of other policies keep none)."""
    return sum(memory.host_row_bytes() for memory in session.cache.memories() if hasattr(memory, "host_row_bytes"))


def index_bytes(session: Session) -> int:
    indexes = [getattr(memory, "index", None) for memory in session.cache.memories()]
    return sum(index.vector_nbytes() for index in indexes if index is not None)


def keeps_host_rows(settings: Settings) -> bool:
    """Whether ltri keeps the stored tokens in host rows (MemoryConfig.host_payloads), their only copy while it
    reads: the store then takes the payloads only if the host runs short (or at a save, which this script skips)."""
    return settings.ltri.memory.keeps_host_rows(settings.device)


def store_space(settings: Settings, n_tokens: int) -> dict:
    """Free space at the store root against what the spans of n_tokens need there (estimate; with host rows,
    what a save or a host running short would need)."""
    settings.store_root.mkdir(parents=True, exist_ok=True)
    memory = settings.ltri.memory
    stored_tokens = max(0, n_tokens - memory.n_sink - memory.n_window)
    needed = stored_tokens * settings.shape.kv_bytes_per_token(settings.torch_dtype) * STORE_SPACE_MARGIN
    return {
        "store_root": str(settings.store_root),
        "store_fs": filesystem_type(settings.store_root),
        "store_needed_gb": needed / 1e9,
        "store_free_gb": shutil.disk_usage(settings.store_root).free / 1e9,
    }


def store_bytes(store: Path) -> int:
    """Bytes the store directory takes on its file system (allocated blocks: LMDB's map file is sparse)."""
    return sum(f.stat().st_blocks * 512 for f in store.rglob("*") if f.is_file())


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding path (tmpfs, ext4...), from /proc/mounts; None where unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    found = [
        (point, kind) for point, kind in mounts if resolved == point or resolved.startswith(point.rstrip("/") + "/")
    ]
    return max(found, key=lambda item: len(item[0]))[1] if found else None


RUNNERS = {"full": run_full, "ltri": run_ltri}


# --------------------------------------------------------------------------------------------- profile


@contextlib.contextmanager
def labelled_phases(session: Session):
    """Wraps ltri's decode and prefill phases in torch.profiler.record_function ranges, for the profile only."""
    import ltri.attention as attention
    from ltri.deferred_segmentation import DeferredSegmentation
    from ltri.offload.span_cache import SpanCache
    from ltri.offload.span_store import SpanStore
    from ltri.span_memory import SpanMemory

    targets = [
        (attention, "attend_with_memory", "ltri.attend_with_memory (one layer)"),
        (attention, "decode_attention", "ltri.decode_attention"),
        (attention, "causal_chunk_attention", "ltri.chunk_attention (sdpa)"),
        (attention, "chunk_self_attention", "ltri.chunk_self_attention (for segmentation)"),
        (SpanMemory, "resident", "ltri.resident_set"),
        (SpanMemory, "_retrieve", "ltri.retrieve"),
        (SpanMemory, "_load", "ltri.load_spans"),
        (SpanMemory, "append", "ltri.append"),
        (DeferredSegmentation, "flush", "ltri.segmentation (all layers)"),
        (SpanMemory, "_add_spans", "ltri.index_vectors_and_evict"),
        (SpanMemory, "_evict", "ltri.evict"),
        (SpanStore, "put_spans", "ltri.store_write"),
        (SpanCache, "get", "ltri.span_cache_get"),
        (SpanStore, "read_spans", "ltri.store_read"),
    ]
    targets += [(cls, "search", "ltri.index_search") for cls in index_classes(session)]
    targets += [(cls, "add", "ltri.index_add") for cls in index_classes(session)]
    saved = []
    try:
        for owner, name, label in targets:
            if hasattr(owner, name):
                saved.append((owner, name, owner.__dict__.get(name)))
                setattr(owner, name, with_label(getattr(owner, name), label))
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def index_classes(session: Session) -> set[type]:
    return {type(memory.index) for memory in session.cache.memories() if getattr(memory, "index", None) is not None}


def with_label(function, label: str):
    @functools.wraps(function)
    def labelled(*args, **kwargs):
        with torch.profiler.record_function(label):
            return function(*args, **kwargs)

    return labelled


def profile_decode(session: Session, logits: torch.Tensor, n_tokens: int, settings: Settings) -> Path:
    """Profiles settings.profile_steps more decode steps (torch.profiler, then cProfile); returns the file."""
    from torch.profiler import ProfilerActivity, profile

    device, steps = session.device, settings.profile_steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_phases(session), profile(activities=activities) as torch_profile:
        step_s, logits = timed_decode(session.prefill, logits, steps, device, Progress("profile"))
    python_profile = cProfile.Profile()
    python_profile.enable()
    python_s, logits = timed_decode(session.prefill, logits, steps, device, Progress("profile"))
    python_profile.disable()
    syncs = sync_sites(
        lambda: timed_decode(session.prefill, logits, steps, device, Progress("syncs")), device, steps, "decode step"
    )
    path = settings.out.with_name(f"{settings.out.stem}_profile_{n_tokens}.txt")
    header = (
        f"ltri decode profile: {settings.shape_name}, context {n_tokens} tokens, {steps} decode steps after the "
        f"timed ones under torch.profiler ({1000 * statistics.median(step_s):.2f} ms median per step), then "
        f"{steps} under cProfile ({1000 * statistics.median(python_s):.2f} ms). Phases nest: attend_with_memory "
        "holds resident_set, which holds retrieve (index_search) and load_spans (span_cache_get, store_read). "
        "Kernel ms: the kernels launched inside a phase; gpu span: the phase's range on the GPU timeline as torch "
        "reports it (rough). In the op tables below, ltri.* rows are these ranges, not ops.\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + torch_tables(torch_profile, device, steps) + python_tables(python_profile) + syncs)
    return path


def profile_prefill(session: Session, n_tokens: int, settings: Settings) -> Path:
    """Profiles settings.profile_steps more prefill chunks of random ids (torch.profiler); returns the file."""
    from torch.profiler import ProfilerActivity, profile

    device, steps, chunk = session.device, settings.profile_steps, settings.ltri.chunk_size
    ids = context_ids(steps * chunk, settings.shape.vocab, settings.seed + 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_phases(session), profile(activities=activities) as torch_profile:
        synchronize(device)
        start = time.perf_counter()
        session.prefill(ids)
        synchronize(device)
        seconds = time.perf_counter() - start
    python_profile = cProfile.Profile()
    python_profile.enable()
    start = time.perf_counter()
    session.prefill(context_ids(steps * chunk, settings.shape.vocab, settings.seed + 2))
    synchronize(device)
    python_s = time.perf_counter() - start
    python_profile.disable()
    ids = context_ids(steps * chunk, settings.shape.vocab, settings.seed + 3)
    syncs = sync_sites(lambda: session.prefill(ids), device, steps, "prefill chunk")
    path = settings.out.with_name(f"{settings.out.stem}_prefill_profile_{n_tokens}.txt")
    header = (
        f"ltri prefill profile: {settings.shape_name}, {steps} chunks of {chunk} tokens read after a context of "
        f"{n_tokens} tokens (and the decode), under torch.profiler: {steps * chunk / seconds:.0f} tokens/s; then "
        f"{steps} more under cProfile: {steps * chunk / python_s:.0f} tokens/s. "
        "Phases as in the decode profile, per chunk; segmentation runs once per chunk for all layers.\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = torch_tables(torch_profile, device, steps, "prefill chunk") + python_tables(python_profile)
    path.write_text(header + tables + syncs)
    return path


def sync_sites(run: Callable[[], object], device: torch.device, steps: int, step_name: str) -> str:
    """Runs run() with CUDA's sync debug mode on and counts where the host waited for the device: the innermost
    frames of ltri's code (three at most) of each synchronising call, per step_name. Empty off CUDA."""
    if device.type != "cuda":
        return ""
    sites: collections.Counter[str] = collections.Counter()

    ours = (f"{os.sep}ltri{os.sep}", f"{os.sep}kernels{os.sep}")

    def note(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [frame for frame in traceback.extract_stack()[:-1] if any(part in frame.filename for part in ours)]
        chain = " < ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in frames[::-1][:3])
        kind = "" if "synchroniz" in str(message) else f" [not a sync: {str(message)[:60]}]"
        sites[(chain or f"{Path(filename).name}:{lineno}") + kind] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = [f"{count / steps:>8.1f}  {site}" for site, count in sites.most_common(40)]
    total = sum(sites.values()) / steps
    header = f"\n== host waits for the device (CUDA sync debug mode), per {step_name}: {total:.1f} ==\n"
    return header + "\n".join(lines) + "\n"


def torch_tables(torch_profile, device: torch.device, steps: int, step_name: str = "decode step") -> str:
    events = torch_profile.key_averages()
    parts = [f"== ltri phases (inclusive times, per {step_name}) ==\n", phase_table(events, steps)]
    if device.type == "cuda":
        parts += ["\n== ops by self device time ==\n", events.table(sort_by="self_device_time_total", row_limit=30)]
    parts += ["\n== ops by self CPU time ==\n", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    return "".join(parts) + "\n"


def phase_table(events, steps: int) -> str:
    """Per labelled phase and decode step: calls, CPU time in the range, time of the kernels it launched, and the
    range's span on the GPU timeline (first to last of its kernels, gaps included)."""
    phases: dict[str, dict[str, float]] = {}
    for event in events:
        if not event.key.startswith("ltri."):
            continue
        phase = phases.setdefault(event.key, {"calls": 0.0, "cpu": 0.0, "kernels": 0.0, "gpu_span": 0.0})
        device_us = getattr(event, "device_time_total", 0.0)
        if str(getattr(event, "device_type", "CPU")).endswith("CPU"):
            phase["calls"] += event.count
            phase["cpu"] += event.cpu_time_total
            phase["kernels"] += device_us
        else:
            phase["gpu_span"] += device_us
    header = f"{'phase':<38} {'calls/step':>10} {'cpu ms/step':>12} {'kernel ms/step':>15} {'gpu span ms/step':>17}"
    lines = [header]
    for key, phase in sorted(phases.items(), key=lambda item: -item[1]["cpu"]):
        per_step = {name: value / steps for name, value in phase.items()}
        lines.append(
            f"{key:<38} {per_step['calls']:>10.1f} {per_step['cpu'] / 1000:>12.3f} "
            f"{per_step['kernels'] / 1000:>15.3f} {per_step['gpu_span'] / 1000:>17.3f}"
        )
    return "\n".join(lines) + "\n"


def python_tables(python_profile: cProfile.Profile) -> str:
    parts = []
    for sort, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
        stream = io.StringIO()
        pstats.Stats(python_profile, stream=stream).strip_dirs().sort_stats(sort).print_stats(50)
        parts.append(f"\n== cProfile, Python functions by {title} ==\n{stream.getvalue()}")
    return "".join(parts)


# --------------------------------------------------------------------------------------------- rows


def measure_row(
    model, method: str, n_tokens: int, settings: Settings, run_index: int, bandwidth: float, checkpoint=None
) -> dict:
    device = torch.device(settings.device)
    free_memory(device)
    progress = Progress(f"{method} {n_tokens}", checkpoint)
    ids = context_ids(n_tokens, settings.shape.vocab, settings.seed).to(device)
    started = time.perf_counter()
    try:
        fields = {"status": "ok", **RUNNERS[method](model, ids, settings, progress)}
    except torch.OutOfMemoryError as error:
        fields = failure("oom", error, progress)
    except LtriError as error:
        fields = failure("store_error", error, progress)
    row = {"method": method, "context_len": n_tokens, **fields, "run": run_index}
    row["wall_s"] = time.perf_counter() - started
    row["prefill_slices"] = slice_rates(progress.marks)
    row.update(memory_fields(device))
    if row["status"] == "ok":
        row.update(floor_fields(model, row["resident_kv_bytes"], bandwidth))
    free_memory(device)
    return row


def failure(status: str, error: BaseException, progress: Progress) -> dict:
    message = str(error).strip().splitlines()
    return {
        "status": status,
        "error": message[0] if message else type(error).__name__,
        "failed_in": progress.phase,
        "tokens_done": progress.tokens_done,
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_fields(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_gpu_gb": None, "peak_gpu_reserved_gb": None}
    return {
        "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
    }


def floor_fields(model, resident_kv_bytes: int, bandwidth: float) -> dict:
    weights = weight_bytes_read(model)
    return {
        "weights_read_gb": weights / 1e9,
        "resident_kv_gb": resident_kv_bytes / 1e9,
        "decode_floor_ms": 1000 * (weights + resident_kv_bytes) / bandwidth,
    }


def warm_up(model, methods: set[str], settings: Settings) -> None:
    """One untimed row per method: first kernels (Triton compiles), allocator, lazy imports. Long enough that ltri
    stores more spans than one chunk of ltri.topk's two-round top-k, so that the timed rows compile nothing."""
    memory = settings.ltri.memory
    n_tokens = memory.n_sink + memory.n_window + 2 * settings.ltri.chunk_size  # ltri stores and retrieves spans
    n_tokens = max(n_tokens, WARM_UP_TOKENS) if settings.shape_name != "tiny" else n_tokens
    quick = replace(settings, decode_tokens=2, profile=False)
    for method in sorted(methods):
        row = measure_row(model, method, n_tokens, quick, run_index=-1, bandwidth=1.0)
        print(f"warm-up {method} ({n_tokens} tokens): {row['status']}", flush=True)


# --------------------------------------------------------------------------------------------- results file


def new_document(settings: Settings) -> dict:
    return {"benchmark": "benchmarks/speed/e2e.py", "settings": settings.fingerprint(), "runs": [], "rows": []}


def load_document(settings: Settings) -> dict:
    """The results file, or a new one; rows a previous command left ``started`` become ``cut_off``."""
    if not settings.out.exists():
        return new_document(settings)
    document = json.loads(settings.out.read_text())
    if document.get("settings") != settings.fingerprint():
        raise SystemExit(
            f"{settings.out} holds results made with other settings (model, dtype, decode tokens, chunking, "
            "ltri config or seed): give another --out, or the same settings."
        )
    for row in document["rows"]:
        if row["status"] == "started":
            row["status"] = "cut_off"
    return document


def save_document(document: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)


def put_row(document: dict, row: dict) -> None:
    """Replace the row of the same method and context, or append it."""
    key = (row["method"], row["context_len"])
    rows = [r for r in document["rows"] if (r["method"], r["context_len"]) != key]
    document["rows"] = [*rows, row]


def merge_rows(document: dict, other: dict, settings: Settings) -> int:
    """Takes other's rows of the asked contexts and methods into document (replacing rows of the same method and
    context), with the runs that measured them; returns how many. other must hold the same settings (but for
    ltri's config when only full's rows are taken: full attention does not read it)."""
    if comparable(other.get("settings"), settings.methods) != comparable(document["settings"], settings.methods):
        raise SystemExit(f"{settings.merge} holds results made with other settings than {settings.out}.")
    wanted = {(m, n) for n in settings.contexts for m in settings.methods}
    taken = [row for row in other["rows"] if (row["method"], row["context_len"]) in wanted]
    runs_before = len(document["runs"])
    document["runs"].extend(other["runs"])
    for row in taken:
        put_row(document, {**row, "run": row["run"] + runs_before})
    return len(taken)


def comparable(settings: dict | None, methods: tuple[str, ...]) -> dict | None:
    """The settings that rows of these methods depend on."""
    if settings is None or "ltri" in methods:
        return settings
    return {key: value for key, value in settings.items() if key != "ltri_config"}


def pending_rows(document: dict, settings: Settings) -> list[tuple[int, str]]:
    done = {(r["method"], r["context_len"]) for r in document["rows"] if r["status"] in FINAL_STATUSES}
    wanted = [(n, m) for n in settings.contexts for m in settings.methods]
    return [(n, m) for n, m in wanted if settings.redo or (m, n) not in done]


def environment(device: torch.device, argv: list[str]) -> dict:
    import transformers

    triton = sys.modules.get("triton")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(triton, "__version__", None),
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "command": shlex.join(["python3", "benchmarks/speed/e2e.py", *argv]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------- report


def print_table(document: dict) -> None:
    runs = document["runs"]
    print(
        f"{'method':<6} {'context':>8} {'status':<11} {'prefill tok/s':>13} {'decode ms/tok':>13} {'median':>8} "
        f"{'floor ms':>9} {'peak GB':>8} {'store GB':>9}"
    )
    for row in sorted(document["rows"], key=lambda r: (r["context_len"], r["method"])):
        print(
            f"{row['method']:<6} {row['context_len']:>8} {row['status']:<11} "
            f"{number(row.get('prefill_tok_s'), '.0f'):>13} {number(row.get('decode_ms_per_token'), '.2f'):>13} "
            f"{number(row.get('decode_ms_median'), '.2f'):>8} "
            f"{number(row.get('decode_floor_ms'), '.2f'):>9} {number(row.get('peak_gpu_gb'), '.1f'):>8} "
            f"{number(row.get('store_gb'), '.1f'):>9}"
        )
    if runs:
        print(
            f"floor: (weights read + resident KV) / {runs[-1]['copy_gb_s']:.0f} GB/s, the copy bandwidth "
            "measured in the run (read + write); weights read = all but the embedding table"
        )


def number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------- main


def measure_pending(document: dict, pending: list[tuple[int, str]], settings: Settings, argv: list[str]) -> None:
    """Builds the model, then measures each pending row, saving the file before, during and after each."""
    device = torch.device(settings.device)
    started = time.perf_counter()
    model = build_model(settings.shape, device, settings.torch_dtype, settings.seed)
    print(f"model built in {time.perf_counter() - started:.1f} s", flush=True)
    bandwidth = copy_bandwidth(device)
    document["runs"].append({**environment(device, argv), "copy_gb_s": bandwidth / 1e9})
    run_index = len(document["runs"]) - 1
    if settings.warmup:
        warm_up(model, {method for _, method in pending}, settings)
    for n_tokens, method in pending:
        started_row = {"method": method, "context_len": n_tokens, "status": "started", "run": run_index}

        def checkpoint(fields: dict, row: dict = started_row) -> None:
            put_row(document, {**row, **fields})
            save_document(document, settings.out)

        checkpoint({})
        row = measure_row(model, method, n_tokens, settings, run_index, bandwidth, checkpoint)
        put_row(document, row)
        save_document(document, settings.out)
        print(f"{method} {n_tokens}: {row['status']} in {row['wall_s']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    document = load_document(settings)
    pending = pending_rows(document, settings)
    if settings.merge is not None:
        n_taken = merge_rows(document, json.loads(settings.merge.read_text()), settings)
        print(f"took {n_taken} rows of {settings.merge}")
    elif pending:
        measure_pending(document, pending, settings, argv)
    else:
        print(f"{settings.out} already holds every row asked for (--redo measures them again)")
    save_document(document, settings.out)
    print_table(document)
    print(f"wrote {settings.out}")
    return document


if __name__ == "__main__":
    main()
