"""Skinny matrix products for decode (a few rows): out = f(x) @ w^T (+ residual), one pass
over the weight with the layer's small neighbours folded in.

- NORM: f(x) = RMSNorm(x) * norm_weight, recomputed per program from the row (a few KB)
  instead of a separate kernel writing it out;
- GATED: x is [rows, 2K] = gate|up and f(x) = silu(gate) * up (SwiGLU);
- RESIDUAL: the result is added to `residual` (rounded first, as transformers adds in bf16).

cuBLAS picks tiles for big products; for a few rows the work is reading the weight once, so
each program streams a [BN, K] stripe of it (BN small, many programs in flight) and applies
each stripe tile, once loaded, to up to BM rows. With programmatic dependent launch the first
weight tile is read while the kernel before is still finishing.

Row invariance: every row runs the same instructions whatever the other rows are, how many
there are and which program holds it (the tiles depend on the weight's shape only; a row's
partial sums are reduced per K tile from a [BN, BK] tensor and added in K order). So a row's
result is bit-identical alone or in any batch: the decode graphs rely on it to compute only
live rows on the GPU and still give every sequence the answer it gets alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl_args

MAX_BM = 8  # rows sharing one loaded weight tile; wider batches take more programs (L2 re-reads)
# Decode steps of up to this many rows run here, row-invariant; wider ones go to cuBLAS's tensor
# cores (this kernel's cost grows with every row: at 8 rows it is ~1.6x cuBLAS's, at 32 ~4x).
INVARIANT_ROWS = 8


@triton.jit
def _row_values(x_row, norm_ptr, rstd, k, k_ok, K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
                dtype: tl.constexpr):
    """f(x) of one row at columns k [BK], in fp32."""
    if GATED:  # rounding points as transformers: silu(gate) in the activation dtype, then * up
        gate = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        up = tl.load(x_row + K + k, mask=k_ok, other=0.0).to(tl.float32)
        xv = ((gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
    else:
        xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:  # normalized row rounded, times the weight rounded, as transformers' RMSNorm
            g = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            xv = ((xv * rstd).to(dtype).to(tl.float32) * g).to(dtype).to(tl.float32)
    return xv


@triton.jit
def _apply_tile(acc, w, x_ptr, stride_x, norm_ptr, rstd, first, M, k, k_ok, K: tl.constexpr, NORM: tl.constexpr,
                GATED: tl.constexpr, BM: tl.constexpr, dtype: tl.constexpr):
    """acc[r] += f(x[first + r]) . w for the rows that exist (w: an fp32 [BN, BK] tile)."""
    r_ids = tl.arange(0, BM)
    for r in tl.static_range(BM):  # no branch on M: the rows' loads can all be in flight at once
        rstd_r = tl.sum(tl.where(r_ids == r, rstd, 0.0), axis=0)
        xv = _row_values(x_ptr + (first + r) * stride_x, norm_ptr, rstd_r, k, k_ok & (k * 0 + first + r < M), K, NORM,
                         GATED, dtype)
        part = tl.sum(w * xv[None, :], axis=1)
        acc = tl.where(r_ids[:, None] == r, acc + part[None, :], acc)
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, M, N, stride_x, stride_w, stride_out, stride_res, eps,
                 K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    first = tl.program_id(0) * BM  # row tiles vary fastest: a stripe's row tiles share its weight in L2
    r_ids = tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    dtype = x_ptr.dtype.element_ty  # the activations' rounding points; the output may be wider (logits)
    # the first weight tile does not depend on the previous kernel: fetch it before waiting
    k = tl.arange(0, BK)
    w_first = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = tl.zeros([BM], tl.float32)
    if NORM:
        for r in tl.static_range(BM):
            squares = 0.0
            for k0 in range(0, K, BK):
                kk = k0 + tl.arange(0, BK)
                xv = tl.load(x_ptr + (first + r) * stride_x + kk, mask=(kk < K) & (kk * 0 + first + r < M),
                             other=0.0).to(tl.float32)
                squares += tl.sum(xv * xv, axis=0)
            rstd = tl.where(r_ids == r, tl.rsqrt(squares / K + eps), rstd)
    acc = tl.zeros([BM, BN], tl.float32)
    acc = _apply_tile(acc, w_first.to(tl.float32), x_ptr, stride_x, norm_ptr, rstd, first, M, k, k < K, K, NORM,
                      GATED, BM, dtype)
    for k0 in range(BK, K, BK):
        kk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n[:, None] * stride_w + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        acc = _apply_tile(acc, w, x_ptr, stride_x, norm_ptr, rstd, first, M, kk, kk < K, K, NORM, GATED, BM, dtype)
    rows = first + r_ids
    out_mask = (rows < M)[:, None] & n_ok[None, :]
    out = acc
    if RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + n[None, :], mask=out_mask, other=0.0).to(tl.float32)
        out = out.to(dtype).to(tl.float32) + r
    tl.store(out_ptr + rows[:, None] * stride_out + n[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


def tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """(BN, BK, warps, stages) from bench/tune_skinny.py on an H200 (docs/perf.md), SmolVLM2-500M's
    decode products at 1 to 8 rows: one-warp programs over narrow stripes (hundreds of them in
    flight), eight warps for the long gated rows of the down projection. They depend on the
    weight's shape only (never on the row count: row invariance)."""
    if n > 8192:        # the vocabulary
        return 8, min(512, triton.next_power_of_2(k)), 1, 3
    if k > 2048:        # down (gated): long rows
        return 2, 1024, 8, 2
    if n > 4096:        # gate|up
        return 4, min(512, triton.next_power_of_2(k)), 1, 2
    return 2, min(1024, triton.next_power_of_2(k)), 1, 2


def gemv(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None, norm: torch.Tensor | None = None,
         eps: float = 0.0, gated: bool = False, config: tuple[int, int, int, int] | None = None,
         float_out: bool = False) -> torch.Tensor:
    """x [M, K] (or [M, 2K] gate|up when gated), w [N, K] -> [M, N] (float32 with float_out,
    else w's dtype); each row's result independent of the others."""
    m = x.shape[0]
    n, k = w.shape
    assert x.stride(1) == 1 and w.stride(1) == 1 and x.shape[1] == (2 * k if gated else k)
    assert (residual is None or residual.stride(1) == 1) and (norm is None or norm.is_contiguous())
    out = torch.empty((m, n), dtype=torch.float32 if float_out else w.dtype, device=w.device)
    bn, bk, warps, stages = config or tiles(n, k)
    bm = min(MAX_BM, triton.next_power_of_2(m))
    res = residual if residual is not None else out
    _gemv_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, w, out, res, norm if norm is not None else w, m, n, x.stride(0), w.stride(0), out.stride(0),
        res.stride(0), eps, K=k, NORM=norm is not None, GATED=gated, RESIDUAL=residual is not None,
        BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages, **pdl_args(x))
    return out
