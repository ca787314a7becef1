"""A read-only pass over a tensor's bytes: what only reading them takes, the floor for a kernel that must read them
(issue 4's sparse attention target, NOTES.md steps 24, 26 and 46).

The attention benchmark compares the sparse attention kernel with a copy of the same keys and values
(``copy_same_bytes``: read and write); torch's own reductions over the bytes were slower than the kernel itself
(step 26), so they were no floor. This kernel does nothing but load: each program reads BLOCK x ITERS consecutive
int32 words (the bf16 keys and values two to a word; 16 bytes a thread a load) and writes their wrapped int32 sum, so
that no load can be dropped. ``attention.py``'s kernel sweep times it in each of ``READ_SHAPES`` over the same bytes
as the kernel, per layer in a graph of --layers distinct buffers (so that no layer finds its bytes in L2).

    words  (n,) int32, contiguous      the bytes to read
    out    (ceil(n / (BLOCK * ITERS)),) int32   each program's wrapped sum of its words

CUDA tensors run the kernel, CPU tensors the torch reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from ltri.kernels import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first use


@dataclass(frozen=True)
class ReadShape:
    """Words a program reads per load step (BLOCK), load steps (ITERS), warps."""

    block: int
    iters: int
    warps: int

    @property
    def label(self) -> str:
        return f"{self.block}x{self.iters}x{self.warps}"

    def n_programs(self, n_words: int) -> int:
        return -(-n_words // (self.block * self.iters))


# 4 words (16 bytes) a thread a load: block = 128 x warps
READ_SHAPES = (ReadShape(512, 1, 4), ReadShape(512, 4, 4), ReadShape(1024, 2, 8), ReadShape(1024, 4, 8),
               ReadShape(2048, 4, 16), ReadShape(1024, 8, 8))  # fmt: skip


def _read_kernel(words_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Program p: the wrapped int32 sum of words [p * BLOCK * ITERS, (p + 1) * BLOCK * ITERS)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for step in tl.static_range(ITERS):
        at = start + step * BLOCK + tl.arange(0, BLOCK)
        total += tl.load(words_ptr + at, mask=at < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(total, axis=0))


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_read_kernel)


def _check(words: torch.Tensor, shape: ReadShape, out: torch.Tensor) -> None:
    if words.dim() != 1 or words.dtype != torch.int32 or not words.is_contiguous():
        raise ValueError(f"words must be a contiguous (n,) int32 tensor, got {words.dtype} {tuple(words.shape)}.")
    if out.shape != (shape.n_programs(words.numel()),) or out.dtype != torch.int32 or out.device != words.device:
        raise ValueError(f"out must be ({shape.n_programs(words.numel())},) int32 on the words' device.")


def read_words_triton(words: torch.Tensor, shape: ReadShape, out: torch.Tensor) -> torch.Tensor:
    _check(words, shape, out)
    _triton_kernels(interpreting())[(out.numel(),)](words, out, words.numel(), BLOCK=shape.block, ITERS=shape.iters,
                                        num_warps=shape.warps)  # fmt: skip
    return out


def read_words_reference(words: torch.Tensor, shape: ReadShape, out: torch.Tensor) -> torch.Tensor:
    """Each program's sum in int64, wrapped to int32 as the kernel's int32 adds wrap."""
    _check(words, shape, out)
    chunk = shape.block * shape.iters
    padded = torch.zeros(out.numel() * chunk, dtype=torch.int64, device=words.device)
    padded[: words.numel()] = words
    sums = padded.view(out.numel(), chunk).sum(dim=1)
    out.copy_(((sums + 2**31) % 2**32 - 2**31).to(torch.int32))
    return out


def read_words(words: torch.Tensor, shape: ReadShape, out: torch.Tensor) -> torch.Tensor:
    """out = each program's wrapped sum of its words: the kernel on CUDA (or under TRITON_INTERPRET=1), else the
    reference."""
    if use_triton(words, out):
        return read_words_triton(words, shape, out)
    return read_words_reference(words, shape, out)
