"""Builds every Triton kernel for an H100 (sm_90) on a machine without a GPU: python3 tests/kernel_build.py.

Triton's interpreter runs the kernels' arithmetic but not their compilation, so a kernel can pass every CPU test
and still fail to build on the GPU (a loop variable named `_` reassigned with another type, code after a constexpr
`return`: both happened, see benchmarks/speed/NOTES.md step 12). This script calls each kernel's launcher on CPU
tensors, in float32, float16 and bfloat16, with the launch itself recorded instead of run, and compiles each
recorded launch (its argument types, constexprs, warps and stages) for sm_90 down to a cubin with Triton's own
compiler and ptxas, and refuses a launch that needs more shared memory than an H100 block has. Each launch is
specialized as Triton's JIT specializes it on the GPU (``specialization``): pointers and integers divisible by 16
say so, integers equal to 1 become constants. Without that (before 2026-12-05) no load was known to be aligned, so
none was vectorized or pipelined, and the registers and spills this build reported were not the GPU's. In half precision
it also builds the launch shapes benchmarks/speed/attention.py sweeps by default, so that a device call does not
find a broken one. It must run without TRITON_INTERPRET=1 (the interpreter replaces the language's functions);
tests/test_kernels_build_for_cuda.py runs it in a subprocess. Exit status 1 and one line per failure. It builds with
this machine's Triton, which need not be the device's (3.9 here, 3.6.0 on the H100s in December 2026): a typing rule
that differs between them goes unseen (a bf16 dot whose operand came out float32 on the H100 only: NOTES.md step 25).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import sys
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POINTER_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64", torch.int64: "i64",
    torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


class Recorder:
    """Stands for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return functools.partial(self._record, grid)

    def _record(self, grid, *args, **kwargs) -> None:
        self.launches.append((self.kernel, args, kwargs))


def record_launches(module, launch) -> list:
    """The launches the call launch() makes through module._triton_kernels (restored afterwards)."""
    launches: list = []
    original = module._triton_kernels
    kernels = original(False)  # also binds the module's helper functions to their JIT wrappers
    if isinstance(kernels, tuple):
        stand_in = tuple(Recorder(kernel, launches) for kernel in kernels)
    else:
        stand_in = Recorder(kernels, launches)
    module._triton_kernels = lambda interpret: stand_in
    try:
        launch()
    finally:
        module._triton_kernels = original
    return launches


def argument_type(value) -> str | None:
    """Triton's signature type of a runtime argument; None: a constexpr (None values are)."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def specialization(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT builds them on the GPU: each runtime argument's
    type and specialization by Triton's own rule (``native_specialize_impl``, honouring do_not_specialize), so that
    a pointer or integer divisible by 16 carries tt.divisibility 16 and an integer equal to 1 becomes a constant."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    values = launch_values(kernel, args, kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values.get(param.name, param.default)
        if value is inspect.Parameter.empty:
            raise TypeError(f"{kernel.__name__}: no value for {param.name}")
        if param.is_constexpr or argument_type(value) is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):  # the specialization reads only data_ptr (and a CPU tensor has one)
            value = _Pointer(value.data_ptr(), value.dtype)
        kind, spec = native_specialize_impl(
            CUDABackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", spec
            continue
        signature[param.name] = kind
        if spec:
            attrs[(index,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


class _Pointer:
    """What the JIT's specialization reads of a tensor argument: its address and dtype."""

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def launch_values(kernel, args: tuple, kwargs: dict) -> dict:
    """The kernel's parameters by name, as the launch passed them (options such as num_warps left out)."""
    values = dict(zip(kernel.arg_names, args, strict=False))
    values.update({name: value for name, value in kwargs.items() if name in kernel.arg_names})
    return values


def compile_launch(kernel, args: tuple, kwargs: dict):
    """Compiles one recorded launch for sm_90 (raises what Triton raises); returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {name: value for name, value in kwargs.items() if name not in kernel.arg_names}
    signature, constexprs, attrs = specialization(kernel, args, kwargs)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """Launches that compile to the same binary share a key (tensor contents and sizes do not matter)."""
    signature, constexprs, attrs = specialization(kernel, args, kwargs)
    options = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in kernel.arg_names))
    described = tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items()))
    return (kernel.__name__, described, options)


BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed")


def sweep_shapes():
    """The launch shapes benchmarks/speed/attention.py sweeps by default: (sparse attention Tiles, PackLaunch,
    MapTiles) lists, None standing for the kernel's default shape."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import attention as benchmark
    from ltri.kernels.chunk_attention_map import MapTiles
    from ltri.kernels.pack_rotate import PackLaunch

    kernels = benchmark.load_kernels()
    tiles = benchmark.parse_tiles(benchmark.SWEEP_TILES, kernels)
    packs = benchmark.parse_shapes(benchmark.SWEEP_PACK, PackLaunch)
    maps = benchmark.parse_shapes(benchmark.SWEEP_CHUNK_MAP, MapTiles)
    return tiles, packs, maps


def topk_sweep():
    """((rows, entries, k), radix bits, warps) of every launch the attention benchmark's top-k sweep times (None:
    the kernel's default)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import attention as benchmark
    from ltri.kernels.topk_select import RADIX_BITS

    launches = benchmark.parse_shapes(benchmark.SWEEP_TOPK, lambda *launch: launch)
    cases = [case[1:] for case in benchmark.topk_cases(benchmark.Shape())]
    return [(case, *(launch or (RADIX_BITS, None))) for case in cases for launch in launches]


def launchers(dtype: torch.dtype):
    """(module, call) pairs: each kernel's launcher on small CPU inputs the kernel tests also use, and in half
    precision the attention benchmark's swept launch shapes on a Llama-3-8B layer's shape."""
    import test_kernel_budget_rows as budget
    import test_kernel_cache_slots as cache_slots
    import test_kernel_cached_gather as gather
    import test_kernel_chunk_attention_map as chunk_map
    import test_kernel_disjoint_nms as nms
    import test_kernel_lowrank_scores as lowrank
    import test_kernel_pack_rotate as pack
    import test_kernel_rms_norm as norm
    import test_kernel_selected_attention as selected
    import test_kernel_settled_votes as settled
    import test_kernel_silu_mul as silu
    import test_kernel_span_max as span_max
    import test_kernel_span_scores as span_scores
    import test_kernel_span_votes as span_votes
    import test_kernel_sparq_scores as sparq
    import test_kernel_sparse_attention as attention
    import test_kernel_topk_select as topk
    import test_kernel_vector_scores as vectors
    from ltri.kernels import budget_rows as m_budget
    from ltri.kernels import cache_slots as m_cache_slots
    from ltri.kernels import cached_gather as m_gather
    from ltri.kernels import chunk_attention_map as m_chunk_map
    from ltri.kernels import disjoint_nms as m_nms
    from ltri.kernels import lowrank_scores as m_lowrank
    from ltri.kernels import pack_rotate as m_pack
    from ltri.kernels import rms_norm as m_norm
    from ltri.kernels import selected_attention as m_selected
    from ltri.kernels import settled_votes as m_settled
    from ltri.kernels import silu_mul as m_silu
    from ltri.kernels import span_max as m_span_max
    from ltri.kernels import span_scores as m_span_scores
    from ltri.kernels import span_votes as m_span_votes
    from ltri.kernels import sparq_scores as m_sparq
    from ltri.kernels import sparse_attention as m_attention
    from ltri.kernels import topk_select as m_topk
    from ltri.kernels import vector_scores as m_vectors

    for nheads_kv, group, q_len, n_keys, headdim, causal, ragged in attention.CASES:
        q, k, v, n_valid = attention.make_inputs(nheads_kv, group, q_len, n_keys, headdim, ragged, dtype)
        for fused in (False, True):
            yield m_attention, functools.partial(m_attention.sparse_attention_triton, q, k, v, n_valid,
                                                 causal=causal, fused_merge=fused)  # fmt: skip
    for case in selected.CASES:
        for fused in (False, True):
            yield m_selected, functools.partial(m_selected.selected_attention_triton,
                                                *selected.make_inputs(*case, dtype), fused_merge=fused)  # fmt: skip
    rows = torch.arange(0, 1025, 3)  # candidates read in place (the fused decode step's scores)
    for case in span_votes.CASES:
        yield m_span_votes, functools.partial(m_span_votes.span_votes_triton, *span_votes.make_inputs(*case, dtype))
    for case in sparq.CASES:
        q, k, n_valid = sparq.make_inputs(*case[:4], case[5], dtype)
        yield m_sparq, functools.partial(m_sparq.sparq_scores_triton, q, k, case[4], n_valid)
        yield m_sparq, functools.partial(m_sparq.sparq_scores_triton, q, k, case[4], rows=rows[rows < case[2]])
    for case in lowrank.CASES:
        q, keys_lowrank, basis, n_valid = lowrank.make_inputs(*case, dtype)
        yield m_lowrank, functools.partial(m_lowrank.lowrank_scores_triton, q, keys_lowrank, basis, case[4], n_valid)
        yield m_lowrank, functools.partial(m_lowrank.lowrank_scores_triton, q, keys_lowrank, basis, case[4],
                                           rows=rows[rows < case[2]])  # fmt: skip
    for nheads_kv, group, n_cand, headdim, rank, width in lowrank.WHOLE_ROW_CASES:
        q, keys_lowrank, basis, n_valid = lowrank.make_inputs(nheads_kv, group, n_cand, headdim, width, True, dtype)
        rows_view, rows = lowrank.token_major(keys_lowrank), torch.arange(n_cand)
        for cache in (None, lowrank.projection_cache(rows_view, n_cand)):  # the captured step's: with its cache
            yield m_lowrank, functools.partial(m_lowrank.lowrank_scores_triton, q, rows_view, basis, rank, n_valid,
                                               rows, cache)  # fmt: skip
    for n_rows, n_keys, k in topk.CASES:
        scores = torch.randn(n_rows, n_keys).to(dtype)
        for n_valid in (None, torch.full((n_rows,), n_keys)):
            yield m_topk, functools.partial(m_topk.topk_tokens_triton, scores, k, n_valid)
        yield m_topk, functools.partial(m_topk.topk_found_triton, scores, k)
    for case in pack.CASES:
        for per_head in (False, True):
            sources = pack.make_inputs(*case, dtype, per_head=per_head)
            yield m_pack, functools.partial(m_pack.pack_rotate_triton, sources)
        cached = pack.with_row_cache(pack.make_inputs(*case, dtype))
        yield m_pack, functools.partial(m_pack.pack_rotate_triton, cached)
        yield m_pack, functools.partial(m_pack.pack_rotate_triton, pack.with_step_token(cached))  # the decode step's
        selected = pack.make_inputs(*case, dtype, per_head=True)  # a selector's step: rows per head
        yield m_pack, functools.partial(m_pack.pack_rotate_triton, pack.with_step_token(selected))  # no cache
        selected_cached = pack.with_step_token(pack.with_row_cache(selected))  # a cache per head
        yield m_pack, functools.partial(m_pack.pack_rotate_triton, selected_cached)
    for case in norm.CASES:
        x, residual, weight = norm.make_inputs(*case, dtype)
        for with_residual in (None, residual):
            yield m_norm, functools.partial(m_norm.rms_norm_triton, x, weight, 1e-5, with_residual)
    for case in silu.CASES:
        yield m_silu, functools.partial(m_silu.silu_mul_triton, *silu.make_inputs(*case, dtype))
    for case in gather.CASES:
        yield m_gather, functools.partial(m_gather.cached_gather_triton, *gather.make_inputs(*case, dtype))
    for case in chunk_map.CASES:
        query, keys = chunk_map.make_inputs(*case, dtype)
        yield m_chunk_map, functools.partial(m_chunk_map.chunk_attention_map_triton, query, keys, 0.125)
    for case in vectors.CASES:
        queries, index_vectors = vectors.make_inputs(*case, dtype)
        yield m_vectors, functools.partial(m_vectors.vector_scores_triton, queries, index_vectors)
    for case in settled.CASES:  # the scores in each dtype; the pooled votes and the rest are float32
        for part in settled.PARTS:
            for how in ("mean", "max"):
                launch = functools.partial(settled.run, launch=m_settled.settled_votes_triton, case=case, part=part,
                                           how=how, dtype=dtype)  # fmt: skip
                yield m_settled, launch
    for case in span_scores.CASES:
        queries, index_vectors, first, count, n_valid = span_scores.make_index(*case, dtype)
        yield m_span_scores, functools.partial(m_span_scores.span_scores_triton, queries, index_vectors, first, count,
                                               n_valid, first.numel() + 3, case[4])  # fmt: skip
    if dtype != torch.float32:
        yield from swept_launches(dtype)
    if dtype == torch.float32:  # span_max reads float32 votes only
        for n_slots, m, budget_size, max_len in budget.CASES:  # votes float32, tables int64
            votes, lengths, first_rows = budget.make_votes(n_slots, max_len)
            candidates = torch.arange(m)
            for rows in (first_rows, None):
                yield m_budget, functools.partial(m_budget.budget_rows_triton, votes, candidates, lengths, rows,
                                                  budget_size, max_len)  # fmt: skip
        for (n_rows, budget_size), heads in itertools.product(cache_slots.CASES, (None, 3)):  # int32 slots, int64 rows
            rows, n_retrieved = next(cache_slots.steps_by_head(n_rows, budget_size, heads))
            slots = torch.full((*rows.shape[:-1], n_rows + 1), -1, dtype=torch.int32)
            yield m_cache_slots, functools.partial(m_cache_slots.refresh_slots_triton, slots, torch.zeros_like(rows),
                                                   torch.zeros(heads or 1, dtype=torch.long), rows, n_retrieved,
                                                   torch.zeros(2, dtype=torch.long))  # fmt: skip
        for case in span_max.CASES:
            a, b, first_rows, lengths = span_max.make_spans(*case)
            yield m_span_max, functools.partial(m_span_max.span_max_triton, a, b, case[2], first_rows, lengths, case[1])
        for case in nms.CASES + [(32, 2048, 8, 128, False)]:  # float64 scores: once; the last, a 2048-token chunk
            yield m_nms, functools.partial(m_nms.disjoint_nms_triton, nms.make_grid(*case), case[2])


def distinct_launches():
    """(dtype, kernel, args, kwargs) of every distinct launch of every launcher, in each dtype."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernel_build.py compiles for the GPU: run it without TRITON_INTERPRET=1.")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    seen = set()
    for dtype in DTYPES:
        for module, launch in launchers(dtype):
            for kernel, args, kwargs in record_launches(module, launch):
                key = launch_key(kernel, args, kwargs)
                if key not in seen:
                    seen.add(key)
                    yield dtype, kernel, args, kwargs


def swept_launches(dtype: torch.dtype):
    """The benchmark's swept launch shapes, the defaults included, on a Llama-3-8B layer's shape: decode attention
    over 3136 keys (32 query heads, 8 KV heads, headdim 128) and over 2112 resident keys + 1024 selected tokens, a
    captured step's packing, a 256-token chunk map."""
    import test_kernel_pack_rotate as pack
    import test_kernel_selected_attention as selected
    from ltri.kernels import chunk_attention_map as m_chunk_map
    from ltri.kernels import pack_rotate as m_pack
    from ltri.kernels import selected_attention as m_selected
    from ltri.kernels import sparse_attention as m_attention
    from ltri.kernels import topk_select as m_topk

    tiles, packs, maps = sweep_shapes()
    q, k = torch.randn(32, 1, 128).to(dtype), torch.randn(8, 3136, 128).to(dtype)
    n_valid = torch.full((8,), 3136)
    for tile in tiles:
        for split_size in (None, 256):
            yield m_attention, functools.partial(m_attention.sparse_attention_triton, q, k, k, n_valid,
                                                 split_size=split_size, tiles=tile)  # fmt: skip
    selected_inputs = selected.make_inputs(8, 4, 64 + 2048, 4096, 1024, 128, dtype)
    yield m_selected, functools.partial(m_selected.selected_attention_triton, *selected_inputs)
    positions, candidates = selected_inputs[7] % 2048, torch.arange(2048)  # the benchmark's: top-k positions
    yield m_selected, functools.partial(m_selected.selected_attention_triton, *selected_inputs[:7], positions,
                                        *selected_inputs[8:], candidates=candidates)  # fmt: skip
    sources = pack.make_inputs(64, 123, 50, 8, 4, 128, 97, 49, 0, dtype)
    for launch in packs:
        yield m_pack, functools.partial(m_pack.pack_rotate_triton, sources, launch)
    query, keys = torch.randn(32, 256, 128).to(dtype), torch.randn(8, 256, 128).to(dtype)
    for shape in maps:
        yield m_chunk_map, functools.partial(m_chunk_map.chunk_attention_map_triton, query, keys, 0.1, shape)
    for (n_rows, n_keys, k), radix_bits, num_warps in topk_sweep():  # float32 scores, built once (not dtype's)
        yield m_topk, functools.partial(m_topk.topk_tokens_triton, torch.randn(n_rows, n_keys), k,
                                        radix_bits=radix_bits, num_warps=num_warps)  # fmt: skip
    import read_floor  # the kernel sweep's read-only pass over the 3136 keys' K/V bytes (int32 words)

    words = torch.zeros(2 * 8 * 3136 * 128 // 2, dtype=torch.int32)
    for shape in read_floor.READ_SHAPES:
        out = torch.empty(shape.n_programs(words.numel()), dtype=torch.int32)
        yield read_floor, functools.partial(read_floor.read_words_triton, words, shape, out)


SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KB)


def main() -> int:
    seen, failures = 0, []
    for dtype, kernel, args, kwargs in distinct_launches():
        seen += 1
        try:
            shared = compile_launch(kernel, args, kwargs).metadata.shared
        except Exception as error:  # noqa: BLE001 (every kind of build failure is reported the same way)
            first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            failures.append(f"{kernel.__name__} {dtype}: {type(error).__name__}: {first_line}")
            continue
        if shared > SHARED_MEMORY_LIMIT:
            failures.append(f"{kernel.__name__} {dtype} {kwargs}: {shared} bytes of shared memory, over the H100's")
    for failure in failures:
        print("FAILED", failure)
    print(f"built {seen - len(failures)} of {seen} kernel launches for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
