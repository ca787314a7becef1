"""A decoder layer's projections that read the same input as one weight: q, k and v in one matmul, the MLP's gate and
up in another.

At one token a projection is a matrix-vector product whose time is the reading of its weight. In the 128K decode
profile of an 8B-shaped model on the H100 (``benchmarks/speed/results/e2e_dense_off_h100_6adea05_profile_profile_
131072.txt``) the k and v projections (8 MB each) took 5.65 us a call where reading them takes about 2.7, and cuBLAS
split q, k, v and down into a matmul and a reduction each: 12 launches a layer for 7 projections. One weight for q, k
and v (48 MB) and one for gate and up (235 MB) make that 4 matmuls a layer, each of a size that reads near the
memory's rate.

``fuse_projections`` builds the joined weights once and points the modules' own parameters at row slices of them (a
row slice of a row-major matrix is itself contiguous), so the model still holds each weight once: transformers'
forward (prefill) reads the slices, the decode step the whole. Modules already laid out so (another session's
fusion of the same model) are joined by a view, not copied again.

Shapes: qkv_weight (q_out + k_out + v_out, hidden), gate_up_weight (2 * intermediate, hidden), each bias (rows,) or
None; x (..., hidden) -> the projections (..., out) as views of one output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FusedProjections:
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]  # the output widths of q, k and v
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    intermediate: int

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_proj(x), k_proj(x), v_proj(x) from one matmul: views (..., width) of its output."""
        return F.linear(x, self.qkv_weight, self.qkv_bias).split(self.qkv_sizes, dim=-1)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_proj(x), up_proj(x) from one matmul: views (..., intermediate) of its output."""
        return F.linear(x, self.gate_up_weight, self.gate_up_bias).split(self.intermediate, dim=-1)


def fuse_projections(
    q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, mlp: nn.Module
) -> FusedProjections | None:
    """The joined weights of a layer's q, k, v and its MLP's gate and up (the modules' parameters then point into
    them); None, with nothing changed, unless every one is a plain nn.Linear without hooks, all on one device in one
    dtype, with biases on all or none of each group."""
    attention, gated = (q_proj, k_proj, v_proj), (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None))
    if not (_joinable(attention) and _joinable(gated)) or attention[0].weight.device != gated[0].weight.device:
        return None
    qkv_weight, qkv_bias = _joined(attention)
    gate_up_weight, gate_up_bias = _joined(gated)
    sizes = tuple(module.out_features for module in attention)
    return FusedProjections(qkv_weight, qkv_bias, sizes, gate_up_weight, gate_up_bias, gated[0].out_features)


def _joinable(modules: tuple) -> bool:
    if not all(type(module) is nn.Linear for module in modules):
        return False
    weights = [module.weight for module in modules]
    has_bias = {module.bias is not None for module in modules}
    hooked = any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in modules)
    return (
        not hooked
        and len(has_bias) == 1
        and len({(w.device, w.dtype, w.shape[1]) for w in weights}) == 1
        and all(w.is_contiguous() for w in weights)
    )


def _joined(modules: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias): the modules' weights (and biases) stacked by rows, the modules' parameters re-pointed at them."""
    weight = _stacked([module.weight for module in modules])
    bias = None if modules[0].bias is None else _stacked([module.bias for module in modules])
    return weight, bias


def _stacked(parameters: list[nn.Parameter]) -> torch.Tensor:
    """The parameters stacked along their first dimension: a view where they already lie so in one storage, else a
    new tensor whose row slices then become the parameters' data."""
    rows = sum(p.shape[0] for p in parameters)
    shape = (rows, *parameters[0].shape[1:])
    if _adjacent(parameters):
        return parameters[0].detach().as_strided(shape, parameters[0].stride())
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, as the parameters were, whatever the mode
        stacked = torch.cat([p.detach() for p in parameters])
    for parameter, part in zip(parameters, stacked.split([p.shape[0] for p in parameters]), strict=True):
        parameter.data = part
    return stacked


def _adjacent(parameters: list[nn.Parameter]) -> bool:
    """Whether the contiguous parameters lie one after the other in one storage."""
    storage = parameters[0].untyped_storage().data_ptr()
    at = parameters[0].data_ptr()
    for p in parameters:
        if p.untyped_storage().data_ptr() != storage or p.data_ptr() != at:
            return False
        at += p.numel() * p.element_size()
    return True
