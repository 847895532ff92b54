"""Decode attention over the KV cache with grouped-query heads, split over the sequence.

Each row (one sequence) attends to tokens 0..position of its slot in the paged cache
(engine/kv_cache.py): a chunk's keys are gathered page by page through the block table. Batch 1 has only kv_heads
programs of work per row, far too few for a GPU, so the keys are cut into `splits` chunks
(flash-decoding): each program reduces one chunk for all query heads sharing a kv head
(one tl.dot for the group), and a second kernel merges the chunks' partial softmaxes.

Row invariance: up to INVARIANT_ROWS rows (kernels/gemv.py) the number of splits depends on
the device and the model, never on the row count, and a row's chunks on its own length only;
splits past a row's keys write nothing and are left out of its merge. So a row's result is the
same alone or in any such batch. Wider steps, whose products are cuBLAS's (not row-invariant
either), cut fewer splits: their rows fill the GPU, and the batch-1 cut left 32 rows x 900 keys
in one-block programs, 3x the time of reading the keys once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl_args
from .gemv import INVARIANT_ROWS


@triton.jit
def _split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, slots_ptr, positions_ptr, m_ptr, l_ptr, acc_ptr,
                  stride_q, stride_table, stride_page, stride_token, scale,
                  H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                  PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(positions_ptr + row) + 1
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = kv_head * G + g
    q = tl.load(q_ptr + row * stride_q + heads[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
    table = table_ptr + tl.load(slots_ptr + row) * stride_table
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    n0 = start
    while n0 < end:  # a while loop: Triton's interpreter can't take tensor bounds in range()
        n = n0 + tl.arange(0, BLOCK)
        valid = n < end
        page = tl.load(table + n // PAGE, mask=valid, other=0)
        offsets = (page * stride_page + (n % PAGE) * stride_token + kv_head * D)[:, None] + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
        n0 += BLOCK
    part = (row * H + heads) * SPLITS + split
    used = (g < G) & (start + 0 * g < length)  # a split past the row's keys: nothing to merge
    tl.store(m_ptr + part, m, mask=used)
    tl.store(l_ptr + part, l, mask=used)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=used[:, None])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, positions_ptr, stride_out, H: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    length = tl.load(positions_ptr + row) + 1
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK  # as the split kernel cut it
    used = s < tl.cdiv(length, chunk)
    part = (row * H + head) * SPLITS + s
    m = tl.load(m_ptr + part, mask=used, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=used, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty chunks have m = -inf: weight 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * stride_out + head * D + d, out.to(out_ptr.dtype.element_ty))


WIDE_PROGRAMS_PER_SM = 4  # a wide step's programs (rows x kv heads x splits) per multiprocessor


def default_splits(num_kv_heads: int, max_seq: int, block: int, device: torch.device, rows: int = 1) -> int:
    """Enough chunks for ~2 programs per multiprocessor at batch 1, never chunks shorter than a
    block. Up to INVARIANT_ROWS rows not a function of the row count (row invariance): wider
    batches get more programs, and a row with few keys fills few of its chunks. Wider steps:
    ~WIDE_PROGRAMS_PER_SM programs per multiprocessor over all their rows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    per_sm, counted_rows = (WIDE_PROGRAMS_PER_SM, rows) if rows > INVARIANT_ROWS else (2, 1)
    return max(1, min(triton.cdiv(max_seq, block), triton.cdiv(per_sm * sms, counted_rows * num_kv_heads)))


def split_buffers(q, k_cache, v_cache, block_table, num_heads: int, splits: int):
    """Checks the layouts the split kernels index, and makes their buffers: each split's running
    max m and sum l [rows, H, splits] and accumulator [rows, H, splits, D] (fp32), and the output."""
    assert q.stride(1) == 1 and k_cache.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    assert block_table.stride(1) == 1
    rows, d = q.shape[0], q.shape[1] // num_heads
    m = torch.empty((rows, num_heads, splits), dtype=torch.float32, device=q.device)
    acc = torch.empty((rows, num_heads, splits, d), dtype=torch.float32, device=q.device)
    return m, torch.empty_like(m), acc, torch.empty((rows, q.shape[1]), dtype=q.dtype, device=q.device)


def dot_precision(q) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must stay exact; bf16 ignores it


def decode_attention(q, k_cache, v_cache, block_table, slots, positions, num_heads: int, num_kv_heads: int,
                     splits: int | None = None, block: int = 64) -> torch.Tensor:
    """q [rows, H*D] (rotated, unit stride), paged caches [pages, page_size, KV*D] with
    block_table [slots, max_pages] -> [rows, H*D]."""
    rows = q.shape[0]
    d = q.shape[1] // num_heads
    group = num_heads // num_kv_heads
    max_seq = block_table.shape[1] * k_cache.shape[1]
    splits = splits or default_splits(num_kv_heads, max_seq, block, q.device, rows)
    m, l, acc, out = split_buffers(q, k_cache, v_cache, block_table, num_heads, splits)
    if not rows:
        return out
    precision = dot_precision(q)
    _split_kernel[(rows, num_kv_heads, splits)](
        q, k_cache, v_cache, block_table, slots, positions, m, l, acc, q.stride(0), block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), 1.0 / math.sqrt(d), H=num_heads, KV=num_kv_heads, G=group,
        GP=max(16, triton.next_power_of_2(group)), D=d, SPLITS=splits, BLOCK=block, PAGE=k_cache.shape[1],
        PRECISION=precision, num_warps=4, **pdl_args(q))
    _merge_kernel[(rows, num_heads)](m, l, acc, out, positions, out.stride(0), H=num_heads, D=d, SPLITS=splits,
                                     SP=triton.next_power_of_2(splits), BLOCK=block, num_warps=2, **pdl_args(q))
    return out
