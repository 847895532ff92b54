"""RoPE on q and k fused with the KV-cache write. A program takes one row and a group of
heads: each q head is rotated, each k head is rotated straight into the paged cache at
(slot, position) (engine/kv_cache.py) with its v head copied beside it. A decode step (one
row) gives every head its own program; a prefill (many rows) gives each row one program for
all its heads, so cos/sin are computed once per row. For a prefill the rotated keys can also
be written out contiguously, sparing attention a gather from the cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl_args


@triton.jit
def _rotate_head(src, dst, cos, sin, i, D: tl.constexpr):
    """Rotate-half RoPE of one head of D values from src to dst."""
    half: tl.constexpr = D // 2
    x = tl.load(src + i).to(tl.float32)
    partner = tl.load(src + (i + half) % D).to(tl.float32)
    rotated = tl.where(i < half, -partner, partner)
    dtype = dst.dtype.element_ty
    out = (x * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)
    tl.store(dst + i, out.to(dtype))


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, table_ptr, slots_ptr,
                       positions_ptr, inv_freq_ptr, stride_q, stride_k, stride_v, stride_q_out, stride_k_out,
                       stride_table, stride_page, stride_token, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr,
                       HEADS: tl.constexpr, K_OUT: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    pos = tl.load(positions_ptr + row)
    i = tl.arange(0, D)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + i % (D // 2))
    dtype = q_out_ptr.dtype.element_ty
    # transformers casts cos/sin to the activation dtype and rounds each product
    cos = tl.cos(angle).to(dtype).to(tl.float32)
    sin = tl.sin(angle).to(dtype).to(tl.float32)
    page = tl.load(table_ptr + tl.load(slots_ptr + row) * stride_table + pos // PAGE)
    cache_row = page * stride_page + (pos % PAGE) * stride_token
    for j in tl.static_range(HEADS):
        head = tl.program_id(1) * HEADS + j  # 0..H-1: a q head; H..H+KV-1: a k head and its v head
        if head < H:
            _rotate_head(q_ptr + row * stride_q + head * D, q_out_ptr + row * stride_q_out + head * D, cos, sin, i, D)
        elif head < H + KV:
            kv = head - H
            cache_at = cache_row + kv * D
            _rotate_head(k_ptr + row * stride_k + kv * D, k_cache_ptr + cache_at, cos, sin, i, D)
            if K_OUT:
                _rotate_head(k_ptr + row * stride_k + kv * D, k_out_ptr + row * stride_k_out + kv * D, cos, sin, i, D)
            v = tl.load(v_ptr + row * stride_v + kv * D + i)
            tl.store(v_cache_ptr + cache_at + i, v.to(v_cache_ptr.dtype.element_ty))


def rope_cache_write(q, k, v, k_cache, v_cache, block_table, slots, positions, inv_freq, num_heads: int,
                     num_kv_heads: int, keys_out: bool = False):
    """Rotate q [rows, H*D] and k [rows, KV*D] at positions; k and v go to the paged cache
    ([pages, page_size, KV*D], unit stride inside a token) at (slots, positions) through
    block_table [slots, max_pages]. Returns the rotated q, contiguous, and with `keys_out` also
    the rotated k: (q, k)."""
    rows = q.shape[0]
    d = q.shape[1] // num_heads
    assert q.stride(1) == k.stride(1) == v.stride(1) == 1 and k_cache.stride(2) == 1
    assert k_cache.stride() == v_cache.stride() and block_table.stride(1) == 1
    q_out = torch.empty((rows, q.shape[1]), dtype=q.dtype, device=q.device)
    k_out = torch.empty((rows, k.shape[1]), dtype=q.dtype, device=q.device) if keys_out else q_out
    heads = num_heads + num_kv_heads
    per_program = 1 if rows * heads < 4096 else heads  # decode batches: a program per head
    if rows:
        _rope_cache_kernel[(rows, triton.cdiv(heads, per_program))](
            q, k, v, q_out, k_out, k_cache, v_cache, block_table, slots, positions, inv_freq,
            q.stride(0), k.stride(0), v.stride(0), q_out.stride(0), k_out.stride(0), block_table.stride(0),
            k_cache.stride(0), k_cache.stride(1), H=num_heads, KV=num_kv_heads, D=d, HEADS=per_program,
            K_OUT=keys_out, PAGE=k_cache.shape[1], num_warps=1 if per_program == 1 else 2, **pdl_args(q))
    return (q_out, k_out) if keys_out else q_out
