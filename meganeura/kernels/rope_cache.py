"""RoPE on q and k fused with the KV-cache write: one program per (row, head) rotates a q
head, or rotates a k head straight into cache[slot, position] and copies its v head beside
it (a decode step has one row: parallel over heads, not one program doing all of them)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(src, dst, inv_freq_ptr, pos, D: tl.constexpr):
    """Rotate-half RoPE of one head of D values from src to dst."""
    i = tl.arange(0, D)
    half: tl.constexpr = D // 2
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + i % half)
    dtype = dst.dtype.element_ty
    # transformers casts cos/sin to the activation dtype and rounds each product
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    x = tl.load(src + i).to(tl.float32)
    partner = tl.load(src + (i + half) % D).to(tl.float32)
    rotated = tl.where(i < half, -partner, partner)
    out = (x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)
    tl.store(dst + i, out.to(dtype))


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, positions_ptr,
                       inv_freq_ptr, stride_q, stride_k, stride_v, stride_q_out, stride_slot, stride_token,
                       H: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: a q head; H..H+KV-1: a k head and its v head
    pos = tl.load(positions_ptr + row)
    if head < H:
        _rotate_head(q_ptr + row * stride_q + head * D, q_out_ptr + row * stride_q_out + head * D, inv_freq_ptr,
                     pos, D)
    else:
        kv = head - H
        cache_at = tl.load(slots_ptr + row) * stride_slot + pos * stride_token + kv * D
        _rotate_head(k_ptr + row * stride_k + kv * D, k_cache_ptr + cache_at, inv_freq_ptr, pos, D)
        i = tl.arange(0, D)
        v = tl.load(v_ptr + row * stride_v + kv * D + i)
        tl.store(v_cache_ptr + cache_at + i, v.to(v_cache_ptr.dtype.element_ty))


def rope_cache_write(q, k, v, k_cache, v_cache, slots, positions, inv_freq, num_heads: int,
                     num_kv_heads: int) -> torch.Tensor:
    """Rotate q [rows, H*D] and k [rows, KV*D] at positions; k and v go to cache[slots, positions]
    ([slots, max_seq, KV*D], contiguous). Returns the rotated q, contiguous."""
    rows = q.shape[0]
    d = q.shape[1] // num_heads
    assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    q_out = torch.empty((rows, q.shape[1]), dtype=q.dtype, device=q.device)
    if rows:
        _rope_cache_kernel[(rows, num_heads + num_kv_heads)](
            q, k, v, q_out, k_cache, v_cache, slots, positions, inv_freq,
            q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), k_cache.stride(0), k_cache.stride(1),
            H=num_heads, D=d, num_warps=1)
    return q_out
