"""SwiGLU: silu(gate) * up in one pass over the halves of the merged gate|up projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, stride_g, stride_u, stride_out, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n
    g = tl.load(g_ptr + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=inside, other=0.0).to(tl.float32)
    # transformers rounds silu(gate) to the activation dtype before multiplying by up
    act = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=inside)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [rows, n] (row-strided views allowed) -> silu(gate) * up, contiguous."""
    rows, n = gate.shape
    assert gate.stride(1) == 1 and up.stride(1) == 1 and up.shape == gate.shape
    out = torch.empty((rows, n), dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _swiglu_kernel[(rows, triton.cdiv(n, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n,
                                                      BLOCK=block, num_warps=4)
    return out
