"""Triton kernels for the torch backend on CUDA, one a file, each tested against the numpy
reference (on CPU through Triton's interpreter, TRITON_INTERPRET=1).

Each file holds the `@triton.jit` kernel and a small launcher taking torch tensors. The
numerics copy transformers' bf16 rounding points (see docs/design.md) so that the bf16 path
stays close to the reference model, not just to the fp32 math.
"""

import functools

import torch
import triton.language as tl

# Programmatic dependent launch (Hopper and later, Triton >= 3.4): a decode kernel is launched
# while the one before it is still running, loads its weights, then waits (`gdc_wait`) for
# that kernel's results; it writes nothing before the wait. False turns it off (to compare).
USE_PDL = True


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def pdl_args(t: torch.Tensor) -> dict:
    """The launch arguments for a kernel with a `PDL` flag, for tensors on t's device."""
    on = USE_PDL and t.is_cuda and _pdl_device(t.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
