"""A decode step's RMS norm, after the residual add that precedes it, in one launch.

    x         (n_rows, hidden) float                     the input (a layer's attention output, projected)
    weight    (hidden,) x's dtype                        the norm's scale
    residual  (n_rows, hidden) x's dtype, or None        added to x first, in x's dtype (as torch adds)
  returns
    normed    (n_rows, hidden) x's dtype                 weight * (s * rsqrt(mean(s^2) + eps)), s = x (+ residual)
    summed    (n_rows, hidden) x's dtype, or None        s, with a residual: the layer's new residual stream

The formula is transformers' RMSNorm of the Llama family (Llama, Mistral, Qwen2, Qwen3): s in float32, normalized,
rounded to the dtype, then multiplied by the weight in the dtype. Its module runs it as eight torch kernels (two
casts, a square, a mean, an add, rsqrt and two products), twice a layer in a decode step's dense segments, each
after a residual add of its own. With this kernel and ``silu_mul`` an 8B-shaped model's 128K decode step took 11.92 ms
against 12.92 with the modules' ops (H100, ``benchmarks/speed/results/e2e_dense_{on,off}_h100_6adea05_profile.json``,
NOTES.md step 48). The kernel gives each row one program holding the whole row (hidden up to _MAX_HIDDEN). Its mean
sums in another order than torch's, so a result may differ from the module's in the last bit of the dtype.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_MAX_HIDDEN = 32768  # columns one program holds; wider rows take the reference


def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, normed_ptr, summed_ptr, n_cols, eps, stride_x, stride_residual, stride_normed,
    stride_summed, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: the residual added (and written), the row normalized in float32, rounded, scaled by the weight."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=in_row, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(summed_ptr + row * stride_summed + cols, x, mask=in_row)
    s = x.to(tl.float32)
    variance = tl.sum(s * s, axis=0) / n_cols
    normalized = (s * tl.math.rsqrt(variance + eps)).to(dtype)
    weight = tl.load(weight_ptr + cols, mask=in_row, other=0.0)
    normed = (weight.to(tl.float32) * normalized.to(tl.float32)).to(dtype)
    tl.store(normed_ptr + row * stride_normed + cols, normed, mask=in_row)


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_rms_norm_kernel)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x (n_rows, hidden) and weight (hidden,), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}.")  # fmt: skip
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"the residual must be shaped as x {tuple(x.shape)}, got {tuple(residual.shape)}.")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if len({t.dtype for t in tensors}) != 1 or not x.dtype.is_floating_point:
        dtypes = [t.dtype for t in tensors]
        raise ValueError(f"rms_norm wants one float dtype for x, weight and residual, got {dtypes}.")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("rms_norm's tensors must be on one device.")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain torch, as transformers' RMSNorm computes it: (normed, summed)."""
    _check_inputs(x, weight, residual)
    summed = None if residual is None else x + residual
    s = (x if summed is None else summed).to(torch.float32)
    normalized = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype), summed


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's launch; same contract as rms_norm."""
    _check_inputs(x, weight, residual)
    n_rows, n_cols = x.shape
    if n_cols > _MAX_HIDDEN:
        raise ValueError(f"the rms_norm kernel holds rows of at most {_MAX_HIDDEN} columns, got {n_cols}.")
    if x.stride(1) != 1 or weight.stride(0) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm wants x, weight and residual contiguous along the hidden dimension.")
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    summed = None if residual is None else torch.empty_like(normed)
    block = max(16, 1 << (n_cols - 1).bit_length())
    num_warps = 4 if block <= 1024 else 8 if block <= 8192 else 16
    _triton_kernels(interpreting())[(n_rows,)](
        x, residual if residual is not None else x, weight, normed, summed if summed is not None else normed, n_cols,
        float(eps), x.stride(0), residual.stride(0) if residual is not None else 0, normed.stride(0),
        normed.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return normed, summed


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed, summed): weight * RMS-normalized (x + residual), and x + residual (None without a residual); see the
    module's docstring. The Triton kernel on CUDA (or under TRITON_INTERPRET=1) for rows of at most _MAX_HIDDEN
    columns, the torch reference otherwise."""
    if x.dim() == 2 and x.shape[1] <= _MAX_HIDDEN and use_triton(x, weight):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
