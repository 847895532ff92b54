"""Weights kept compact on the CPU (4-bit and 8-bit) and the products that read them.

A decode step reads every weight once, so on the CPU its time is the weights' bytes over the
memory bandwidth: 4-bit weights are an eighth of float32's. The forms:

* `Int4Weight`: w[n, k] = d[n, g] * q[n, k] + m[n, g], q in 0..15, one (d, m) per group of 32
  along k: GGUF's Q4_1 exactly (Q4_0 is m = -8d). Products run torch's
  `_weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero with scale = d and
  zero = m + 8d.
* `Int8Weight`: w[n, k] = s[n] * q[n, k], q in -127..127, one scale per output row: the form
  `_weight_int8pack_mm` reads. GGUF's Q8_0 has a scale per 32 values, so it is requantized
  per row (the error is bounded by half a row step; docs/design.md).

Both kernels are fast only with bfloat16 activations (measured: 10-60x slower in float32 or
float16), so a product rounds its rows to bfloat16, the kernel accumulates in float32 and rounds
its output to bfloat16; scale and zero are bfloat16 there too. Lookups (an embedding table that
is also the tied lm_head) dequantize rows exactly, in float32.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP = 32        # values per scale (GGUF's block size; int4pack's group size)
_PACK_ROWS = 16   # int4pack needs a multiple of 16 output rows: pad with zero rows
_FORMS = ("int8", "int4")
# GGUF block layouts read here directly: bytes per block of 32 values
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


class CompactWeight:
    """A [N, K] weight in a compact form: `product(x)` is x @ w.T, `w[ids]` dequantized rows."""

    shape: tuple[int, int]

    def product(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 values the form stands for (tests' reference; lookups use rows of it)."""
        return self[torch.arange(self.shape[0])]


class Int4Weight(CompactWeight):
    """codes uint8 [N, K/2] in GGUF's block order (byte j of a block holds values j and j + 16),
    scales and mins float32 [N, K/32]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        self.codes, self.scales, self.mins = codes, scales, mins
        self.shape = (codes.shape[0], codes.shape[1] * 2)
        self._packed = None

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [r, K/2] -> the 4-bit values [r, K] in k order (uint8)."""
        blocks = codes.reshape(codes.shape[0], -1, GROUP // 2)
        return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(codes.shape[0], -1)

    def __getitem__(self, ids) -> torch.Tensor:
        q = self._values(self.codes[ids]).float().reshape(-1, self.shape[1] // GROUP, GROUP)
        w = q * self.scales[ids][..., None] + self.mins[ids][..., None]
        return w.reshape(-1, self.shape[1])

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4pack's weight and its [K/32, N, 2] scales and zeros (bf16), made on first use:
        parts merged into one product (q|k|v) are concatenated before they are packed."""
        if self._packed is None:
            n, k = self.shape
            pad = -n % _PACK_ROWS
            values = self._values(self.codes).to(torch.int32)
            scales, zeros = self.scales, self.mins + 8 * self.scales
            if pad:
                values = torch.cat([values, values.new_zeros(pad, k)])
                scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
            weight = torch._convert_weight_to_int4pack_for_cpu(values, 1)
            scales_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()
            self._packed = (weight, scales_zeros)
        return self._packed

    def product(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        weight, scales_zeros = self.packed()
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, GROUP, scales_zeros)
        return out[:, : self.shape[0]].to(out_dtype)

    def effective(self) -> torch.Tensor:
        """The float32 weight the product multiplies by: bf16 scale and zero (tests' reference)."""
        scales_zeros = self.packed()[1].float()[:, : self.shape[0]]
        scale, zero = (scales_zeros[..., i].T.repeat_interleave(GROUP, dim=1) for i in (0, 1))
        return (self._values(self.codes).float() - 8) * scale + zero


class Int8Weight(CompactWeight):
    """values int8 [N, K], scales float32 [N]."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values, self.scales = values, scales
        self.shape = tuple(values.shape)
        self._scales_bf16 = scales.to(torch.bfloat16)

    def __getitem__(self, ids) -> torch.Tensor:
        return self.values[ids].float() * self.scales[ids][..., None]

    def product(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.values, self._scales_bf16).to(out_dtype)

    def effective(self) -> torch.Tensor:
        return self.values.float() * self._scales_bf16.float()[:, None]


# ---- making the forms ------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Per group of 32 along k: d = (max - min) / 15, m = min, q = round((w - m) / d)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    q = torch.where(d[..., None] > 0, ((g - lo[..., None]) / d.clamp_min(1e-30)[..., None]).round(), 0)
    q = q.clamp(0, 15).to(torch.uint8)
    codes = q[..., : GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return Int4Weight(codes.reshape(n, k // 2).contiguous(), d.contiguous(), lo.contiguous())


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per output row: s = max|w| / 127, q = round(w / s)."""
    w = w.float()
    s = w.abs().amax(1) / 127
    q = torch.where(s[:, None] > 0, w / s.clamp_min(1e-30)[:, None], 0).round().clamp(-127, 127)
    return Int8Weight(q.to(torch.int8).contiguous(), s.contiguous())


def _f16(blocks: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block [rows, blocks, bytes] as float32."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def from_gguf_blocks(kind: str, data: np.ndarray, shape: tuple[int, int], form: str) -> CompactWeight:
    """A form read straight from GGUF blocks (uint8 [rows, bytes]): Q4_0/Q4_1 as int4
    (exact), Q8_0 as int8 (requantized per row); no float32 copy of the whole weight."""
    n, k = shape
    blocks = data.reshape(n, k // GROUP, _BLOCK_BYTES[kind])
    if form == "int4" and kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks, 0)
        m = _f16(blocks, 2) if kind == "Q4_1" else -8 * d
        start = 4 if kind == "Q4_1" else 2
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., start:]).reshape(n, k // 2))
        return Int4Weight(codes, d, m)
    if form == "int8" and kind == "Q8_0":
        d = _f16(blocks, 0)
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))
        return quantize_int8((q.float() * d[..., None]).reshape(n, k))
    raise ValueError(f"no {form} form is read directly from {kind} blocks")


def fits(form: str, shape: tuple[int, ...]) -> bool:
    """Can a weight of this shape take the form? (2-D, rows of whole groups for int4)"""
    return len(shape) == 2 and (form != "int4" or shape[1] % GROUP == 0)


def reads_blocks(kind: str | None, form: str) -> bool:
    return (form, kind) in {("int4", "Q4_0"), ("int4", "Q4_1"), ("int8", "Q8_0")}


def make_weight(source, form: str) -> CompactWeight:
    """`source`: a float array/tensor [N, K], or (kind, uint8 blocks, shape) from a GGUF file."""
    if form not in _FORMS:
        raise ValueError(f"weight form must be one of {', '.join(_FORMS)}, got {form!r}")
    if isinstance(source, tuple):
        return from_gguf_blocks(*source, form)
    w = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.asarray(source, dtype=np.float32))
    return quantize_int4(w) if form == "int4" else quantize_int8(w)


def concat_rows(parts) -> CompactWeight:
    """Weights of one form stacked along N (a merged q|k|v or gate|up product)."""
    first = parts[0]
    if not all(type(p) is type(first) for p in parts):
        raise TypeError("cannot merge weights of different forms into one product")
    if isinstance(first, Int4Weight):
        return Int4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "mins")))
    return Int8Weight(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]))
