"""RoPE on q and k fused with the KV-cache write: one program per row rotates every q head,
rotates every k head straight into cache[slot, position] and copies v beside it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src, dst, inv_freq_ptr, pos, HEADS: tl.constexpr, HEADS_P: tl.constexpr, D: tl.constexpr):
    """Rotate-half RoPE of HEADS heads of D values from src to dst (pointers to the row)."""
    i = tl.arange(0, D)
    half: tl.constexpr = D // 2
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + i % half)
    dtype = dst.dtype.element_ty
    # transformers casts cos/sin to the activation dtype and rounds each product
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    h = tl.arange(0, HEADS_P)[:, None]
    inside = h < HEADS
    x = tl.load(src + h * D + i[None, :], mask=inside, other=0.0).to(tl.float32)
    partner = tl.load(src + h * D + ((i + half) % D)[None, :], mask=inside, other=0.0).to(tl.float32)
    rotated = tl.where(i[None, :] < half, -partner, partner)
    out = (x * cos[None, :]).to(dtype).to(tl.float32) + (rotated * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(dst + h * D + i[None, :], out.to(dtype), mask=inside)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, positions_ptr,
                       inv_freq_ptr, stride_q, stride_k, stride_v, stride_q_out, stride_slot, stride_token,
                       H: tl.constexpr, HP: tl.constexpr, KV: tl.constexpr, KVP: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    pos = tl.load(positions_ptr + row)
    cache_row = tl.load(slots_ptr + row) * stride_slot + pos * stride_token
    _rotate_heads(q_ptr + row * stride_q, q_out_ptr + row * stride_q_out, inv_freq_ptr, pos, H, HP, D)
    _rotate_heads(k_ptr + row * stride_k, k_cache_ptr + cache_row, inv_freq_ptr, pos, KV, KVP, D)
    cols = tl.arange(0, KVP * D)
    inside = cols < KV * D
    v = tl.load(v_ptr + row * stride_v + cols, mask=inside)
    tl.store(v_cache_ptr + cache_row + cols, v.to(v_cache_ptr.dtype.element_ty), mask=inside)


def rope_cache_write(q, k, v, k_cache, v_cache, slots, positions, inv_freq, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """Rotate q [rows, H*D] and k [rows, KV*D] at positions; k and v go to cache[slots, positions]
    ([slots, max_seq, KV*D], contiguous). Returns the rotated q, contiguous."""
    rows = q.shape[0]
    d = q.shape[1] // num_heads
    assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    q_out = torch.empty((rows, q.shape[1]), dtype=q.dtype, device=q.device)
    if rows:
        _rope_cache_kernel[(rows,)](
            q, k, v, q_out, k_cache, v_cache, slots, positions, inv_freq,
            q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), k_cache.stride(0), k_cache.stride(1),
            H=num_heads, HP=triton.next_power_of_2(num_heads), KV=num_kv_heads,
            KVP=triton.next_power_of_2(num_kv_heads), D=d, num_warps=4)
    return q_out
