"""The gated MLP's activation: silu(gate) * up, in one launch.

    gate, up  (n_rows, intermediate) float, one dtype    the MLP's two input projections
  returns
    (n_rows, intermediate) the same dtype                silu(gate) rounded to the dtype, times up, rounded

As torch computes ``act_fn(gate_proj(x)) * up_proj(x)`` in the Llama family's MLP (two kernels: the activation,
then the product, each in float32 and rounded to the dtype). The kernel gives each program _BLOCK columns of a row.

CUDA tensors run the kernel, CPU tensors the reference, unless TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, use_triton

tl = None  # triton.language, bound by _triton_kernels() on first launch

_BLOCK = 1024  # columns a program


def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    """BLOCK columns of one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=in_row, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=in_row, other=0.0).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    tl.store(out_ptr + row * stride_out + cols, (activated.to(tl.float32) * up).to(dtype), mask=in_row)


@functools.cache
def _triton_kernels(interpret: bool):
    """The JIT wrapper of the kernel above; the only place triton is imported (keyed by interpreter mode)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_silu_mul_kernel)


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dim() != 2 or gate.shape != up.shape:
        shapes = f"{tuple(gate.shape)} and {tuple(up.shape)}"
        raise ValueError(f"silu_mul wants gate and up (n_rows, n) alike, got {shapes}.")
    if gate.dtype != up.dtype or not gate.dtype.is_floating_point or gate.device != up.device:
        raise ValueError(f"silu_mul wants gate and up of one float dtype on one device, got {gate.dtype} on "
                         f"{gate.device} and {up.dtype} on {up.device}.")  # fmt: skip


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain torch, as the MLP computes it."""
    _check_inputs(gate, up)
    return torch.nn.functional.silu(gate) * up


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The kernel's launch; same contract as silu_mul."""
    _check_inputs(gate, up)
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul wants gate and up contiguous along their last dimension.")
    n_rows, n_cols = gate.shape
    out = torch.empty(n_rows, n_cols, dtype=gate.dtype, device=gate.device)
    grid = (n_rows, -(-n_cols // _BLOCK))
    _triton_kernels(interpreting())[grid](
        gate, up, out, n_cols, gate.stride(0), up.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (n_rows, n) in their dtype. The Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch
    reference otherwise."""
    if use_triton(gate, up):
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)
