"""Programmatic dependent launch (PDL) for our Triton kernels on Hopper and newer.

A decode step of a small batch is a chain of short kernels (ten per layer: norms, GEMVs, rotary, attention,
its merge, SiLU), and each boundary costs the next kernel's launch plus the ramp until its loads are in
flight. With PDL a kernel is launched while the one before it still runs: its programs become resident early,
start what does not depend on the previous kernel (a GEMV's first weight tile), and then wait
(``griddepcontrol.wait``) until the previous kernel has finished and its writes are visible.

The rules every kernel launched with ``launch_pdl`` keeps (the caller gets both through :func:`launch_kwargs`):

- ``pdl_wait`` runs in every program before it reads anything an earlier kernel wrote or writes anything an
  earlier kernel may read, and before it returns, even on an early-exit path. That wait is what makes the
  ordering transitive: a kernel that never waited could finish before its own predecessor, and the kernel
  after it would then race that predecessor.
- ``pdl_launch_dependents`` may come first: it only lets the next kernel's programs be scheduled once every
  program of this one has started, so no program of this kernel can be starved by them.

Both instructions are no-ops without PDL, and in CUDA graphs the launch attribute becomes a programmatic edge.
``PAGEDSERVE_PDL=0`` turns it off, and so does ``TRITON_INTERPRET=1`` (both read at import; :func:`set_enabled`
overrides the first in-process).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV = "PAGEDSERVE_PDL"
# Under TRITON_INTERPRET=1 kernels run in the interpreter even on CUDA tensors: it has no griddepcontrol.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_env_on = os.environ.get(ENV, "1") != "0" and not _INTERPRETED
_override: bool | None = None


def set_enabled(value: bool | None) -> None:
    """Force PDL on or off in this process (``None``: back to ``PAGEDSERVE_PDL``). Kernels launched or CUDA
    graphs captured before the call keep what they had."""
    global _override
    _override = value


@functools.cache
def _device_supports(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    cuda_extra = getattr(getattr(tl, "extra", None), "cuda", None)
    return hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents")


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL."""
    wanted = _env_on if _override is None else (_override and not _INTERPRETED)
    if device.type != "cuda" or not wanted:
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(t: torch.Tensor) -> dict:
    """The ``PDL`` constexpr and, where enabled, the ``launch_pdl`` option for a launch on ``t``'s device."""
    if enabled(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its memory operations are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_begin(PDL: tl.constexpr):
    """The prologue of a kernel with nothing to do before its wait: let the next kernel launch, then wait."""
    pdl_launch_dependents(PDL)
    pdl_wait(PDL)


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel launch once every program of this one has started (or finished)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


__all__ = ["ENV", "enabled", "launch_kwargs", "pdl_begin", "pdl_launch_dependents", "pdl_wait", "set_enabled"]
