"""Top-k selection per row, the chosen indices in ascending order, respecting each row's number of valid entries.

    scores  (n_rows, n_keys) float          higher is better (float32, float16 or bfloat16)
    n_valid (n_rows,) int                   entries [0, n_valid[r]) of row r are real, the rest padding
    indices (n_rows, k) int64               ascending (document order)

Rows are KV heads choosing tokens (token selection), one row of span votes (the attention benchmark), or a GQA
group's |q| components (SparQ). torch.topk then torch.sort are several launches; in an older decode profile on
the H100 their kernels averaged 48 us (top-k's gather) and 25 us (sort) a call
(``benchmarks/speed/results/e2e_h100_profile_131072.txt``, retrieval's rows there, not these). On the H100
(``stages_ms`` in ``benchmarks/speed/results/attention_h100_7e52b02.json``) this kernel took 0.015 ms to choose
1024 of 2048 tokens for each of 8 KV heads, against 0.054 ms for torch.topk and sort; but on one long row one
program rereads the row 32 times: 0.154 ms against 0.079 ms for 64 of 16K span votes (512K tokens), 0.043 against
0.053 at 8K (``attention_h100_27966a9.json``). So a row longer than one chunk now goes in two stages
(``topk_tokens_triton``): its parts choose candidates in parallel, then one program a row chooses among them.

The kernel gives each row one program and does not sort. It maps every score to an int32 key in the same order
(the float's bits, the negative ones' magnitude bits flipped), finds the k-th largest key T by a radix search from
the top bits (RADIX_BITS a pass: a histogram of the next bits of the keys that share the bits fixed so far; eight
passes of 4 bits; a row's first 4096 entries stay in registers, the rest are reread from L1/L2), then writes the
entries with key > T and the first (by index) entries with key == T, enough to make k, at the positions a running
prefix sum gives them: the output comes out ascending without a sort. Until 2026-12-06 the search was a binary one
on the 2^32 keys (32 counts of the keys >= a candidate); RADIX_BITS=0 still runs it, for the benchmark's comparison.
On an H200 (``topk`` rows of ``benchmarks/speed/results/attention_h200_9bb52c4.json``, per call in a graph of 8)
4-bit passes took 0.0107 ms for 1,024 of 2,048 tokens of 8 KV heads (binary search 0.0129), 0.0189 for 64 of 4,030
span votes (0.0196), 0.0164 for 64 of 16,318 in two stages (0.0194); 8-bit passes, whose histogram costs more per
entry, were no faster than the binary search (benchmarks/speed/NOTES.md step 26). Both the passes and the work per
entry count: two more 4-bit searches over 512 entries (one a thread), to spare the search over 4,096, added about
0.007 ms on an H100 (NOTES.md step 34), about 1 us a pass; and counting ranks over many programs instead was slower
still (step 32). Nor does a sort: one bitonic sort (``tl.sort``) of a part's 4,096 entries packed as (key, ~index)
int64 keys took 0.112 ms for 64 span votes and 0.032 for 1,024 of 2,048 tokens, 3-7x the radix search (H100, ``topk``
rows of ``benchmarks/speed/results/attention_h100_6adea05.json``, NOTES.md step 47; taken out again).
Ties at the k-th value go to the lowest indices, as in the reference (a stable descending sort); torch.topk leaves
that order unspecified.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_MAX_BLOCK = 4096  # entries a program holds at once; longer rows are read in chunks of this many
RADIX_BITS = 4  # key bits each pass of the radix search fixes (0: a binary search, one bit a pass)
_PART_KEYS = 2048  # entries of a long row's parts in the first of two stages (topk_tokens_triton)


def _topk_select_kernel(
    scores_ptr, n_valid_ptr, out_ptr, out_scores_ptr, index_map_ptr, n_keys, k, stride_row, part_len,
    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr, RADIX_BITS: tl.constexpr,
    WRITE_SCORES: tl.constexpr, HAS_MAP: tl.constexpr, MISSING: tl.constexpr,
):  # fmt: skip
    """One part of a row, entries [part * part_len, (part + 1) * part_len): the k-th largest key by a radix search
    (RADIX_BITS 0: a binary search), then the chosen indices in ascending order, at out[row, part * k : (part + 1) * k].

    WRITE_SCORES: also their scores (float32, padding -inf) at out_scores (the first of two stages); HAS_MAP: write
    index_map[row, index] instead of the index (the second stage, over the first's candidates); MISSING: -1 instead of
    the index of a chosen entry whose score is -inf (``topk_found``)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    row_scores = scores_ptr + row * stride_row
    start = part * part_len
    stop = tl.minimum(start + part_len, n_keys)
    valid = n_keys
    if HAS_VALID:
        valid = tl.minimum(tl.load(n_valid_ptr + row).to(tl.int32), n_keys)
    keys0, in_row0, index0, scores0 = _row_keys(row_scores, start, stop, valid, BLOCK)  # stays in registers
    if RADIX_BITS == 0:
        threshold, ties_wanted = _bisect_threshold(keys0, in_row0, row_scores, start, stop, valid, k, BLOCK, N_CHUNKS)
    else:
        threshold, ties_wanted = _radix_threshold(keys0, in_row0, row_scores, start, stop, valid, k, BLOCK, N_CHUNKS,
                                                  RADIX_BITS)  # fmt: skip
    out_at = (row * n_parts + part) * k
    map_row = index_map_ptr + row * n_keys
    written, ties_seen = _write_taken(keys0, in_row0, index0, scores0, threshold, ties_wanted, 0, 0, out_ptr + out_at,
                                      out_scores_ptr + out_at, map_row, WRITE_SCORES, HAS_MAP, MISSING)  # fmt: skip
    for chunk in range(1, N_CHUNKS):
        keys, in_row, index, scores = _row_keys(row_scores, start + chunk * BLOCK, stop, valid, BLOCK)
        written, ties_seen = _write_taken(keys, in_row, index, scores, threshold, ties_wanted, written, ties_seen,
                                          out_ptr + out_at, out_scores_ptr + out_at, map_row, WRITE_SCORES,
                                          HAS_MAP, MISSING)  # fmt: skip


def _bisect_threshold(keys0, in_row0, row_scores, start, stop, valid, k, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """The k-th largest key T of the part by a binary search on the 2^32 keys (32 counts of the keys >= a
    candidate), and how many entries with key == T the k best take (the rest of k are above T)."""
    lo = tl.full((), -2147483648, tl.int64)  # the k-th largest key lies in [lo, hi]
    hi = tl.full((), 2147483647, tl.int64)
    for step in range(32):  # noqa: B007 (a named loop variable: triton carries `_` across loops)
        mid = (lo + hi + 1) >> 1
        at_least = tl.sum((in_row0 & (keys0 >= mid)).to(tl.int32), axis=0)
        for chunk in range(1, N_CHUNKS):
            keys, in_row, index, scores = _row_keys(row_scores, start + chunk * BLOCK, stop, valid, BLOCK)
            at_least += tl.sum((in_row & (keys >= mid)).to(tl.int32), axis=0)
        enough = at_least >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = tl.sum((in_row0 & (keys0 > lo)).to(tl.int32), axis=0)
    for chunk in range(1, N_CHUNKS):
        keys, in_row, index, scores = _row_keys(row_scores, start + chunk * BLOCK, stop, valid, BLOCK)
        above += tl.sum((in_row & (keys > lo)).to(tl.int32), axis=0)
    return lo.to(tl.int32), k - above


def _radix_threshold(
    keys0, in_row0, row_scores, start, stop, valid, k, BLOCK: tl.constexpr, N_CHUNKS: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):  # fmt: skip
    """The same as _bisect_threshold by a radix search from the top bits: each pass counts, by their next
    RADIX_BITS bits, the keys that share the bits fixed so far (a histogram), and fixes those bits to the largest
    value whose keys and the keys above them make at least the k still wanted. 32 / RADIX_BITS passes."""
    N_BINS: tl.constexpr = max(32, 1 << RADIX_BITS)  # tl.histogram's bins: a multiple of 32
    prefix = tl.full((), 0, tl.uint32)  # the fixed top bits of T's unsigned image
    remaining = tl.full((), 0, tl.int64) + k  # of the k best, those among the keys that share the prefix
    for p in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (p + 1)  # constexpr arithmetic: p is one in a static_range
        counts = _digit_counts(keys0, in_row0, prefix, shift, RADIX_BITS, N_BINS)
        for chunk in range(1, N_CHUNKS):
            keys, in_row, index, scores = _row_keys(row_scores, start + chunk * BLOCK, stop, valid, BLOCK)
            counts += _digit_counts(keys, in_row, prefix, shift, RADIX_BITS, N_BINS)
        at_or_above = tl.cumsum(counts, axis=0, reverse=True)  # (N_BINS,) keys with this digit or a larger one
        enough = at_or_above >= remaining  # true for the digits up to the chosen one
        packed = tl.where(enough, tl.full((N_BINS,), 1 << 32, tl.int64), counts.to(tl.int64))
        total = tl.sum(packed, axis=0)  # (digits that make enough) << 32 + keys above the chosen digit
        n_enough = total >> 32
        remaining -= total - (n_enough << 32)
        prefix = prefix | ((n_enough - 1).to(tl.uint32) << shift)
    threshold = prefix.to(tl.int32, bitcast=True) ^ -2147483648  # back to the signed keys' image
    return threshold, remaining.to(tl.int32)


def _digit_counts(keys, in_row, prefix, shift: tl.constexpr, RADIX_BITS: tl.constexpr, N_BINS: tl.constexpr):
    """(N_BINS,) int32: how many in-row keys whose unsigned image has the top bits of `prefix` above bit
    shift + RADIX_BITS have each value of the RADIX_BITS bits from bit `shift` up."""
    unsigned = (keys ^ -2147483648).to(tl.uint32, bitcast=True)  # the int32 keys' order, as unsigned integers
    shares = in_row
    if shift + RADIX_BITS < 32:  # not the first pass
        shares = shares & ((unsigned >> (shift + RADIX_BITS)) == (prefix >> (shift + RADIX_BITS)))
    digits = (unsigned >> shift) & ((1 << RADIX_BITS) - 1)
    return tl.histogram(digits.to(tl.int32), N_BINS, mask=shares)


def _write_taken(
    keys, in_row, index, scores, threshold, ties_wanted, written, ties_seen, out_row, out_scores_row, map_row,
    WRITE_SCORES: tl.constexpr, HAS_MAP: tl.constexpr, MISSING: tl.constexpr,
):  # fmt: skip
    """Writes one chunk's chosen indices after the `written` ones: keys above the threshold, and ties while fewer
    than ties_wanted were taken (ties_seen in earlier chunks); with WRITE_SCORES their scores too, with HAS_MAP
    map_row[index] instead of index. Returns the updated (written, ties_seen)."""
    tie = in_row & (keys == threshold)
    tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0)  # 1 for the row's first tie
    take = (in_row & (keys > threshold)) | (tie & (tie_rank <= ties_wanted))
    slot = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
    chosen = index.to(tl.int64)
    if HAS_MAP:
        chosen = tl.load(map_row + index, mask=take, other=0)
    if MISSING:
        chosen = tl.where(scores == float("-inf"), -1, chosen)
    tl.store(out_row + slot, chosen, mask=take)
    if WRITE_SCORES:
        tl.store(out_scores_row + slot, scores, mask=take)
    return written + tl.sum(take.to(tl.int32), axis=0), ties_seen + tl.sum(tie.to(tl.int32), axis=0)


def _row_keys(row_scores, start, stop, valid, BLOCK: tl.constexpr):
    """Keys (BLOCK,) int32 of entries [start, start + BLOCK): order-preserving images of the float scores, padding
    (index >= valid) at -inf's key; in_row: index < stop; index: the entries' positions in the row; scores: the
    float32 scores the keys image (padding -inf, -0.0 as 0.0)."""
    index = start + tl.arange(0, BLOCK)
    in_row = index < stop
    scores = tl.load(row_scores + index, mask=in_row, other=0.0).to(tl.float32)
    scores = tl.where(index < valid, scores, float("-inf"))
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ties with 0.0, as in the reference's sort
    bits = scores.to(tl.int32, bitcast=True)
    keys = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return keys, in_row, index, scores


# the plain functions; _triton_kernels binds the helpers' names to their JIT wrappers
_HELPERS = {f.__name__: f for f in (_row_keys, _write_taken, _bisect_threshold, _radix_threshold, _digit_counts)}


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    globals().update({name: triton.jit(helper) for name, helper in _HELPERS.items()})  # the kernel calls them by name
    return triton.jit(_topk_select_kernel, do_not_specialize=["n_keys", "k", "stride_row", "part_len"])


def _check_inputs(scores: torch.Tensor, k: int, n_valid: torch.Tensor | None) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (nheads_kv, n_keys), got {tuple(scores.shape)}.")
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must be between 0 and n_keys ({scores.shape[1]}), got {k}.")
    if n_valid is not None and n_valid.shape != (scores.shape[0],):
        raise ValueError(f"n_valid must have shape (nheads_kv,) = ({scores.shape[0]},), got {tuple(n_valid.shape)}.")


def mask_invalid(scores: torch.Tensor, n_valid: torch.Tensor | None) -> torch.Tensor:
    """scores with keys at or beyond n_valid[h] set to -inf (a new tensor when n_valid is given)."""
    if n_valid is None:
        return scores
    keys = torch.arange(scores.shape[1], device=scores.device)
    return scores.masked_fill(keys[None, :] >= n_valid.to(scores.device)[:, None], float("-inf"))


def topk_tokens_reference(scores: torch.Tensor, k: int, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: a stable descending sort (ties: lowest index first), its first k, sorted ascending."""
    _check_inputs(scores, k, n_valid)
    order = torch.sort(mask_invalid(scores, n_valid), dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :k], dim=1).values


def topk_tokens_triton(
    scores: torch.Tensor, k: int, n_valid: torch.Tensor | None = None, radix_bits: int = RADIX_BITS,
    num_warps: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The kernel's launches; same contract as topk_tokens. radix_bits: the threshold search's bits a pass (4 or 8;
    0: the binary search); num_warps: per program (None: 16 for chunks of 4096 entries, 8 for 2048 or more, else 4:
    on the H100 16 warps chose 64 of 4,030 span votes in 0.0156 ms against 0.0186 with 8, per call in a graph of 8,
    and 8 or 16 took the same 0.0107 for 1,024 of 2,048 tokens, ``topk`` rows of
    ``benchmarks/speed/results/attention_h100_c796a0e.json``; as the default the span top-k stage took 0.0185 ms in
    its graph, ``attention_h100_08729da.json``, where c796a0e's run with 8 warps took 0.0269).

    A row longer than one program's chunk (_MAX_BLOCK) goes in two stages when its parts can each hold k: the row's
    parts of about _PART_KEYS entries each choose their k best in parallel, with their scores, then one program a
    row chooses k of those candidates and writes the indices they came from. A key of the row's top k is in its
    part's top k (fewer than k entries precede it there, as in the row), and the candidates lie in ascending
    order, so the result, ties included, is the one-stage result.
    """
    return _topk(scores, k, n_valid, radix_bits, num_warps)[0]


def _topk(
    scores: torch.Tensor, k: int, n_valid: torch.Tensor | None, radix_bits: int = RADIX_BITS,
    num_warps: int | None = None, found: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(indices, their scores with found, else None): topk_tokens_triton's launches, and topk_found_triton's."""
    _check_inputs(scores, k, n_valid)
    if radix_bits not in (0, 4, 8):
        raise ValueError(f"radix_bits must be 0, 4 or 8, got {radix_bits}.")
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    n_rows, n_keys = scores.shape
    out = torch.empty(n_rows, k, dtype=torch.long, device=scores.device)
    values = torch.empty(n_rows, k, dtype=torch.float32, device=scores.device) if found else None
    if k == 0 or n_rows == 0:
        return out, values
    valid = n_valid.to(device=scores.device) if n_valid is not None else None
    n_parts = parts_per_row(n_keys, k)
    launch = functools.partial(_launch, radix_bits=radix_bits, num_warps=num_warps)
    if n_parts == 1:
        launch(scores, valid, out, k, n_parts=1, part_len=n_keys, out_scores=values, missing=found)
        return out, values
    candidates = torch.empty(n_rows, n_parts * k, dtype=torch.long, device=scores.device)
    candidate_scores = torch.empty(n_rows, n_parts * k, dtype=torch.float32, device=scores.device)
    launch(scores, valid, candidates, k, n_parts, _part_len(n_keys, n_parts), out_scores=candidate_scores)
    launch(candidate_scores, None, out, k, n_parts=1, part_len=n_parts * k, index_map=candidates, out_scores=values,
           missing=found)  # fmt: skip
    return out, values


def parts_per_row(n_keys: int, k: int) -> int:
    """Parts a row's first stage splits into (1: one stage): rows longer than _MAX_BLOCK, in parts of at most
    _PART_KEYS entries, when every part holds at least k entries and the candidates are at most half the row."""
    if n_keys <= _MAX_BLOCK:
        return 1
    n_parts = -(-n_keys // _PART_KEYS)
    last = n_keys - (n_parts - 1) * _part_len(n_keys, n_parts)
    if last < k or 2 * n_parts * k > n_keys:
        return 1
    return n_parts


def _part_len(n_keys: int, n_parts: int) -> int:
    """Entries of each part but the last, which holds the rest."""
    return -(-n_keys // n_parts)


def _launch(
    scores: torch.Tensor, n_valid: torch.Tensor | None, out: torch.Tensor, k: int, n_parts: int, part_len: int,
    out_scores: torch.Tensor | None = None, index_map: torch.Tensor | None = None, radix_bits: int = RADIX_BITS,
    num_warps: int | None = None, missing: bool = False,
) -> None:  # fmt: skip
    """One launch over (rows, n_parts) programs, each choosing k of part_len entries into out (rows, n_parts * k)."""
    block = min(_MAX_BLOCK, max(16, 1 << (part_len - 1).bit_length()))
    num_warps = num_warps or (16 if block >= _MAX_BLOCK else 8 if block >= 2048 else 4)
    if radix_bits:
        block = max(block, 32 * num_warps)  # a histogram's input spans every thread once (none holds a copy)
    _triton_kernels(interpreting())[(scores.shape[0], n_parts)](
        scores, n_valid if n_valid is not None else out, out, out_scores if out_scores is not None else out,
        index_map if index_map is not None else out, scores.shape[1], k, scores.stride(0), part_len,
        HAS_VALID=n_valid is not None, BLOCK=block, N_CHUNKS=-(-part_len // block), RADIX_BITS=radix_bits,
        WRITE_SCORES=out_scores is not None, HAS_MAP=index_map is not None, MISSING=missing,
        num_warps=num_warps,
    )  # fmt: skip


def topk_found_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: topk_tokens_reference's indices, their scores (float32), the index -1 where the score is -inf."""
    indices = topk_tokens_reference(scores, k)
    values = scores.gather(1, indices).float()
    return values, torch.where(values == float("-inf"), -1, indices)


def topk_found_triton(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launches; same contract as topk_found."""
    indices, values = _topk(scores, k, None, found=True)
    return values, indices


def topk_found(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) (n_rows, k): topk_tokens' indices (ascending) with their scores as float32 (-0.0 may come as
    0.0), and -1 for an index whose score is -inf (a search's padding: nothing found there), in the same launches
    as topk_tokens: the gather of the scores and the masking took three torch launches more (a 128K decode step's
    search, once a layer). The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise."""
    if scores.dtype != torch.float64 and use_triton(scores):
        return topk_found_triton(scores, k)
    return topk_found_reference(scores, k)


def topk_tokens(scores: torch.Tensor, k: int, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k best keys per KV head, sorted ascending -> (nheads_kv, k) int64.

    Keys at or beyond n_valid[h] rank below every valid key. When k > n_valid[h], the last k - n_valid[h]
    indices of that row point at padding; because they are sorted, the first min(k, n_valid[h]) are the valid
    ones, so pass ``n_valid.clamp(max=k)`` on to sparse_attention with the gathered keys. Ties go to the lowest
    indices. The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise and for
    float64 scores (the kernel's keys are float32's).
    """
    if scores.dtype != torch.float64 and use_triton(scores):
        return topk_tokens_triton(scores, k, n_valid)
    return topk_tokens_reference(scores, k, n_valid)
