"""Extend attention: a chunk of one sequence's prompt (rows at consecutive positions after the
positions already in its slot: a cached prefix, earlier chunks) attends causally over the
paged KV cache, which already holds the chunk's own keys and values (rope_cache_write).

Why a kernel: SDPA needs the keys gathered into one tensor (a copy of the whole context every
layer) and a mask, and parallelizes over heads x query blocks only (15 programs for a
128-row chunk of SmolVLM2), leaving most of a GPU idle over thousands of keys. Here the keys
are read page by page through the block table, and split over the context as in
flash-decoding (decode_attention.py): each program reduces one block of rows of one query
head over one chunk of keys, and a second kernel merges the chunks' partial softmaxes.

A row sees keys 0..its position; a block of rows cuts its keys (up to its last row's
position) into `splits` chunks. A chunk past a row's position gives that row nothing and is
left out of its merge.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode_attention import dot_precision, split_buffers

BLOCK_ROWS = 32   # query rows per program
BLOCK_KEYS = 64   # keys per inner step


@triton.jit
def _split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, slots_ptr, positions_ptr, m_ptr, l_ptr, acc_ptr,
                  rows, stride_q, stride_table, stride_page, stride_token, scale,
                  H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BM: tl.constexpr,
                  BLOCK: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    r = block * BM + tl.arange(0, BM)
    live = r < rows
    pos = tl.load(positions_ptr + r, mask=live, other=-1)
    length = tl.max(pos, axis=0) + 1  # keys the block's rows reach
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    d = tl.arange(0, D)
    q = tl.load(q_ptr + r[:, None] * stride_q + head * D + d[None, :], mask=live[:, None], other=0.0)
    table = table_ptr + tl.load(slots_ptr) * stride_table  # the chunk's slot: its first row's (padding rows may differ)
    kv = (head // G) * D
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    n0 = start
    while n0 < end:  # a while loop: Triton's interpreter can't take tensor bounds in range()
        n = n0 + tl.arange(0, BLOCK)
        valid = n < end
        page = tl.load(table + n // PAGE, mask=valid, other=0)
        offsets = (page * stride_page + (n % PAGE) * stride_token + kv)[:, None] + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key here yet: no NaN
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
        n0 += BLOCK
    part = (r * H + head) * SPLITS + split
    tl.store(m_ptr + part, m, mask=live)
    tl.store(l_ptr + part, l, mask=live)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, positions_ptr, rows, stride_out, H: tl.constexpr,
                  D: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    mates = (row // BM) * BM + tl.arange(0, BM)  # the rows of its block cut the keys together
    length = tl.max(tl.load(positions_ptr + mates, mask=mates < rows, other=-1), axis=0) + 1
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK  # as the split kernel cut them
    used = (s < SPLITS) & (s * chunk <= tl.load(positions_ptr + row))
    part = (row * H + head) * SPLITS + s
    m = tl.load(m_ptr + part, mask=used, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=used, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * stride_out + head * D + d, out.to(out_ptr.dtype.element_ty))


def default_splits(rows: int, num_heads: int, max_seq: int, device: torch.device) -> int:
    """Enough programs for ~2 per multiprocessor, never chunks shorter than 256 keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    programs = triton.cdiv(rows, BLOCK_ROWS) * num_heads
    return max(1, min(triton.cdiv(max_seq, 256), triton.cdiv(2 * sms, programs)))


def extend_attention(q, k_cache, v_cache, block_table, slots, positions, num_heads: int, num_kv_heads: int,
                     splits: int | None = None) -> torch.Tensor:
    """q [rows, H*D] (rotated, unit stride) of one sequence (slots[0]'s) at `positions`, paged
    caches [pages, page_size, KV*D] holding every position up to the last row's, block_table
    [slots, max_pages] -> [rows, H*D]."""
    rows = q.shape[0]
    d = q.shape[1] // num_heads
    max_seq = block_table.shape[1] * k_cache.shape[1]
    splits = splits or default_splits(rows, num_heads, max_seq, q.device)
    m, l, acc, out = split_buffers(q, k_cache, v_cache, block_table, num_heads, splits)
    if not rows:
        return out
    _split_kernel[(triton.cdiv(rows, BLOCK_ROWS), num_heads, splits)](
        q, k_cache, v_cache, block_table, slots, positions, m, l, acc, rows, q.stride(0), block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), 1.0 / math.sqrt(d), H=num_heads, G=num_heads // num_kv_heads, D=d,
        SPLITS=splits, BM=BLOCK_ROWS, BLOCK=BLOCK_KEYS, PAGE=k_cache.shape[1], PRECISION=dot_precision(q),
        num_warps=4)
    _merge_kernel[(rows, num_heads)](m, l, acc, out, positions, rows, out.stride(0), H=num_heads, D=d,
                                     SPLITS=splits, SP=max(2, triton.next_power_of_2(splits)), BM=BLOCK_ROWS,
                                     BLOCK=BLOCK_KEYS, num_warps=2)
    return out
