"""Programmatic dependent launch: a kernel's programs start while the kernel before it on the stream still runs.

A decode step of one layer is a chain of short dependent kernels (span votes, top-k, token scores, top-k,
attention), each of which, launched the plain way, starts only when the one before it has finished: between them
the GPU sits idle while the next kernel's programs are set up (the attention benchmark timed a one-element kernel
at 0.0043 ms a launch on an H100, inside a CUDA graph too: ``benchmarks/speed/results/attention_h100_08729da.log``).
On sm_90 and later a launch can carry the programmatic-serialization attribute (Triton's ``launch_pdl``): the next
kernel is then set up as soon as every program of the running one has said it may be (``gdc_launch_dependents``),
and its programs wait (``gdc_wait``) until the running kernel has finished and its writes are visible. So each of
these kernels, given ``PDL=True``, first waits and then lets the next one launch, before it touches memory: what
it reads was written, what it writes is no longer read, exactly as with a plain launch, and only the set-up of the
next kernel overlaps this one. A kernel launched this way after one that never says so (a torch kernel) starts
when that one ends, as usual; CUDA graphs keep the attribute as a programmatic edge.

    launch_options(device)  {"PDL": True, "launch_pdl": True} for a CUDA device of compute capability 9.0 or later,
                            else {"PDL": False}: the keyword arguments a launcher adds to its kernel's launch
    _await_inputs(PDL)      the helper each kernel calls first (its JIT wrapper: bind_helper(interpret))

LTRI_PDL=0 in the environment, or ``set_enabled(False)``, turns it off (the attention benchmark times both ways);
the interpreter never uses it.
"""

from __future__ import annotations

import functools
import os

import torch

from . import interpreting

tl = None  # triton.language, bound by bind_helper() on first launch

_enabled: bool | None = None  # set_enabled's choice; None: the environment's (LTRI_PDL, default on)


def set_enabled(enabled: bool | None) -> None:
    """Force dependent launches on (where the device allows them) or off; None: back to LTRI_PDL (default on)."""
    global _enabled
    _enabled = enabled


def wanted() -> bool:
    """Whether dependent launches are wanted at all (set_enabled, else LTRI_PDL != "0"), whatever the device."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("LTRI_PDL", "1") != "0"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def device_allows(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (tests/kernel_build.py, which builds for sm_90 on a CPU,
    replaces this)."""
    if device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on device: PDL (the kernels' constexpr) and Triton's launch_pdl."""
    if not wanted() or interpreting() or not device_allows(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


def _await_inputs(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible, then let the next kernel
    launch; nothing when PDL is off. Call it before the kernel's first load or store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def bind_helper(interpret: bool):
    """The JIT wrapper of _await_inputs (a kernel module binds it under the name its kernels call; keyed by
    interpreter mode, as the modules' kernels are)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_await_inputs)


__all__ = ["launch_options", "set_enabled", "wanted", "bind_helper"]
