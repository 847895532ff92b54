"""Weights kept compact on the CPU (4-bit, 8-bit and 16-bit) and the products that read them.

A decode step reads every weight once, so on the CPU its time is the weights' bytes over the
memory bandwidth: 4-bit weights are an eighth of float32's. The forms:

* `Int4Weight`: w[n, k] = d[n, g] * q[n, k] + m[n, g], q in 0..15, one (d, m) per group of 32
  along k: GGUF's Q4_1 exactly (Q4_0 is m = -8d). Products run torch's
  `_weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero with scale = d and
  zero = m + 8d.
* `Int8Weight`: w[n, k] = d[n, g] * q[n, k], q in -128..127: GGUF's Q8_0 exactly. Products
  run the int4 kernel twice, on q's high and low nibbles.
* `Bf16Weight`: a bfloat16 weight (`dtype="bfloat16"`, or `quantize="bf16"`) packed once for
  oneDNN's products (AMX or AVX-512 bf16 tiles): 1.5-2x torch's plain bf16 matmul at one row,
  1.3x at 128 rows, each row's bits the same whatever the batch (measured: docs/perf.md).
* `F16Weight`: a float16 weight (`quantize="f16"`; a GGUF file's F16 tensors): 11 significant
  bits where bfloat16 keeps 8, the quality of llama.cpp's F16 files.

torch's int4 kernel is fast only with bfloat16 activations (measured: 10-60x slower in float32
or float16), so a product rounds its rows to bfloat16, the kernel accumulates in float32 and
rounds its output to bfloat16; scale and zero are bfloat16 there too. Lookups (an embedding
table that is also the tied lm_head) dequantize rows exactly, in float32.

The compiled CPU decode step (cpu_fused.py) reads the forms' own numbers. The weights it reads
get its C product as `shared_product`, over the numbers in place, so torch never packs a second
copy (and a row's result never depends on how many rows a prefill has).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

GROUP = 32        # values per scale (GGUF's block size; int4pack's group size)
_PACK_ROWS = 16   # int4pack needs a multiple of 16 output rows: pad with zero rows
_PACK_CHUNK = 4096  # rows packed at a time (a multiple of int4pack's 64-row blocks)
_FORMS = ("int8", "int4", "bf16", "f16")
# GGUF block layouts read here directly: bytes per block of 32 values
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


class CompactWeight:
    """A [N, K] weight in a compact form: `product(x)` is x @ w.T, `w[ids]` dequantized rows.

    The form's own numbers are dropped once packed for products, unless `lookups` is set (an
    embedding table that is also the tied lm_head): the packed form holds them once."""

    shape: tuple[int, int]
    lookups = False
    shared_product = None  # x -> x @ w.T over the numbers in place, once the compiled step reads them
    merged = None  # (weak refs to parts, their concat_rows): merging them again gives that same weight

    def product(self, x: torch.Tensor, out_dtype: torch.dtype | None = None, invariant: bool = False) -> torch.Tensor:
        """x @ w.T, in out_dtype or else the kernel's own (no extra cast). `invariant`: each row's
        bits must not depend on the row count (a decode graph's); the forms' kernels compute each
        row alone anyway, but for F16Weight's float32 fallback."""
        out = self.shared_product(x) if self.shared_product is not None else self._torch_product(x, invariant)
        return out if out_dtype is None else out.to(out_dtype)

    def _torch_product(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 values the form stands for (tests' reference; lookups use rows of it)."""
        return self[torch.arange(self.shape[0])]


def _pack_int4(values_of, n: int, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4pack's weight for 4-bit values [N, K] (0..15; `values_of(start, stop)` gives rows
    start..stop-1) and its [K/32, N, 2] scales and zeros in bf16; N is padded to int4pack's
    multiple of 16 with zero rows. Packed in chunks of rows (int4pack packs blocks of 64 rows:
    chunks on those bounds concatenate), so neither the values nor the int32 copy it takes
    exist for the whole weight at once."""
    pad = -n % _PACK_ROWS
    chunks = []
    for start in range(0, n, _PACK_CHUNK):
        rows = values_of(start, min(start + _PACK_CHUNK, n)).to(torch.int32)
        if start + _PACK_CHUNK >= n and pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        chunks.append(torch._convert_weight_to_int4pack_for_cpu(rows, 1))
    if pad:
        scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
    weight = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return weight, torch.stack([scales.T, zeros.T], dim=-1).to(torch.bfloat16).contiguous()


def _int4_product(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed[0], GROUP, packed[1])
    return out if out.shape[1] == n else out[:, :n]


def _per_group(t: torch.Tensor) -> torch.Tensor:
    """[N, K/32] -> [N, K]: each group's number repeated over its 32 values."""
    return t.repeat_interleave(GROUP, dim=-1)


class Int4Weight(CompactWeight):
    """codes uint8 [N, K/2] in GGUF's block order (byte j of a block holds values j and j + 16),
    scales and mins float32 [N, K/32]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        self.codes, self.scales, self.mins = codes, scales, mins
        self.shape = (codes.shape[0], codes.shape[1] * 2)
        self._packed = None

    @staticmethod
    def _values(codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [r, K/2] -> the 4-bit values [r, K] in k order (uint8)."""
        blocks = codes.reshape(codes.shape[0], -1, GROUP // 2)
        return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(codes.shape[0], -1)

    def __getitem__(self, ids) -> torch.Tensor:
        return self._values(self.codes[ids]).float() * _per_group(self.scales[ids]) + _per_group(self.mins[ids])

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Made on first use: parts merged into one product (q|k|v) are concatenated before
        they are packed (int4pack interleaves rows in blocks of 64)."""
        if self._packed is None:
            self._packed = _pack_int4(lambda a, b: self._values(self.codes[a:b]), self.shape[0], self.scales,
                                      self.mins + 8 * self.scales)
            if not self.lookups:
                self.codes = self.scales = self.mins = None
        return self._packed

    def _torch_product(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        return _int4_product(x, self.packed(), self.shape[0])  # bfloat16

    def effective(self) -> torch.Tensor:
        """The float32 weight the product multiplies by: scale and zero rounded to bf16, as
        packed (tests' reference; before packing, or with lookups)."""
        scale, zero = (_per_group(t.to(torch.bfloat16).float()) for t in (self.scales, self.mins + 8 * self.scales))
        return (self._values(self.codes).float() - 8) * scale + zero


class Int8Weight(CompactWeight):
    """values int8 [N, K], scales float32 [N, K/32]: GGUF's Q8_0 exactly.

    Products split each value into its high and low nibbles, q = 16 * (q >> 4) + (q & 15), and
    run two int4pack products: (h - 8) * 16d + 0 with h = (q >> 4) + 8, and (l - 8) * d + 8d;
    both scales are powers of two times bf16(d), so the pair multiplies by bf16(d) * q. (torch's
    `_weight_int8pack_mm` takes one scale per row: a Q8_0 file requantized to it cost 2x the
    KL divergence, docs/rejected-optimizations.md.)"""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        self.values, self.scales = values, scales
        self.shape = tuple(values.shape)
        self._packed = None

    def __getitem__(self, ids) -> torch.Tensor:
        return self.values[ids].float() * _per_group(self.scales[ids])

    def packed(self):
        if self._packed is None:
            n, q = self.shape[0], self.values
            zero = torch.zeros_like(self.scales)
            self._packed = (_pack_int4(lambda a, b: (q[a:b] >> 4) + 8, n, 16 * self.scales, zero),
                            _pack_int4(lambda a, b: q[a:b] & 15, n, self.scales, 8 * self.scales))
            if not self.lookups:
                self.values = self.scales = None
        return self._packed

    def _torch_product(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        high, low = self.packed()
        n = self.shape[0]
        return _int4_product(x, high, n).float() + _int4_product(x, low, n).float()

    def effective(self) -> torch.Tensor:
        scale = _per_group(self.scales.to(torch.bfloat16).float())
        return self.values.float() * scale


class _Float16Bits(CompactWeight):
    """values [N, K] in a 16-bit float type."""

    values: torch.Tensor

    def __getitem__(self, ids) -> torch.Tensor:
        return self.values[ids].float()

    def effective(self) -> torch.Tensor:
        return self.values.float()


class Bf16Weight(_Float16Bits):
    """values bfloat16 [N, K]. torch's products (packed for oneDNN) round their rows to bfloat16
    and their output too (the kernel accumulates in float32): the lm_head's logits come out at
    bf16 precision, as a bfloat16 transformers model gives them."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values.to(torch.bfloat16).contiguous()
        self.shape = tuple(values.shape)
        self._packed = None

    def packed(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.values, 1)
            if not self.lookups:
                self.values = None
        return self._packed

    def _torch_product(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed(), None, "none", [], "")


F16_MAX = 65504.0


class F16Weight(_Float16Bits):
    """values float16 [N, K]. Without the compiled step, products widen the weight to float32
    (exact) a block of rows at a time (at 128 rows as fast here as oneDNN's float16 product),
    decode graphs' two rows at a time (correct, not fast)."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.dtype != torch.float16 and values.numel() and values.abs().max() > F16_MAX:
            raise ValueError(f"float16 holds magnitudes up to {F16_MAX:g}, this weight has "
                             f"{float(values.abs().max()):.4g}: quantize it as bf16 instead")
        self.values = values.to(torch.float16).contiguous()
        self.shape = tuple(values.shape)

    def _torch_product(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        if not invariant:
            return self._widened(x)
        # torch's float32 product takes another kernel for one row than for several: two rows
        # at a time (a lone row doubled) give each row the same bits whatever the batch
        pairs = [x[i:i + 2] if i + 1 < len(x) else x[i:].repeat(2, 1) for i in range(0, len(x), 2)]
        return torch.cat([self._widened(p) for p in pairs])[:len(x)]

    def _widened(self, x: torch.Tensor) -> torch.Tensor:
        """All rows at once, into one output (a prefill's logits can be 0.2 GB: not held twice)."""
        x = x.float()
        out = torch.empty(len(x), self.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, self.shape[0], _PACK_CHUNK):
            out[:, i:i + _PACK_CHUNK] = x @ self.values[i:i + _PACK_CHUNK].float().T
        return out


def bf16_products() -> bool:
    """Does this CPU multiply bfloat16 natively (oneDNN on AMX or AVX-512 bf16)?"""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ---- making the forms ------------------------------------------------------------------------

def _by_row_chunks(w: torch.Tensor, quantize_rows) -> list[torch.Tensor]:
    """quantize_rows (rows -> tensors) over chunks of rows, each output concatenated: the float
    temporaries never exist for the whole weight at once (a 49152 x 576 embedding table is
    113 MB in float32, and quantizing it whole took several such copies)."""
    parts = [quantize_rows(w[i:i + _PACK_CHUNK].float()) for i in range(0, len(w), _PACK_CHUNK)]
    return [torch.cat(outputs) for outputs in zip(*parts)]


def _int4_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n, k = rows.shape
    g = rows.reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    q = torch.where(d[..., None] > 0, ((g - lo[..., None]) / d.clamp_min(1e-30)[..., None]).round(), 0)
    q = q.clamp(0, 15).to(torch.uint8)
    return (q[..., : GROUP // 2] | (q[..., GROUP // 2:] << 4)).reshape(n, k // 2), d, lo


def _int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n, k = rows.shape
    g = rows.reshape(n, k // GROUP, GROUP)
    d = g.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, g / d.clamp_min(1e-30)[..., None], 0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), d


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Per group of 32 along k: d = (max - min) / 15, m = min, q = round((w - m) / d)."""
    return Int4Weight(*_by_row_chunks(w, _int4_rows))


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per group of 32 along k (Q8_0's form): d = max|w| / 127, q = round(w / d)."""
    return Int8Weight(*_by_row_chunks(w, _int8_rows))


def _f16(blocks: np.ndarray, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block [rows, blocks, bytes] as float32."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def from_gguf_blocks(kind: str, data: np.ndarray, shape: tuple[int, int], form: str) -> CompactWeight:
    """A form read straight from GGUF blocks (uint8 [rows, bytes]), exactly: Q4_0/Q4_1 as
    int4, Q8_0 as int8, F16 as f16, BF16 as bf16; no float32 copy of the whole weight."""
    n, k = shape
    if (kind, form) in (("F16", "f16"), ("BF16", "bf16")):
        values = torch.from_numpy(np.array(data, copy=True).view(np.int16).reshape(n, k))  # not the mapped file
        return F16Weight(values.view(torch.float16)) if form == "f16" else Bf16Weight(values.view(torch.bfloat16))
    blocks = data.reshape(n, k // GROUP, _BLOCK_BYTES[kind])
    if form == "int4" and kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks, 0)
        m = _f16(blocks, 2) if kind == "Q4_1" else -8 * d
        start = 4 if kind == "Q4_1" else 2
        codes = torch.from_numpy(np.ascontiguousarray(blocks[..., start:]).reshape(n, k // 2))
        return Int4Weight(codes, d, m)
    if form == "int8" and kind == "Q8_0":
        q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k))
        return Int8Weight(q, _f16(blocks, 0))
    raise ValueError(f"no {form} form is read directly from {kind} blocks")


def fits(form: str, shape: tuple[int, ...]) -> bool:
    """Can a weight of this shape take the form? (2-D; the integer forms: rows of whole groups of 32)"""
    return len(shape) == 2 and (form in ("bf16", "f16") or shape[1] % GROUP == 0)


def reads_blocks(kind: str | None, form: str) -> bool:
    return (form, kind) in {("int4", "Q4_0"), ("int4", "Q4_1"), ("int8", "Q8_0"), ("f16", "F16"), ("bf16", "BF16")}


def make_weight(source, form: str) -> CompactWeight:
    """`source`: a float array/tensor [N, K], or (kind, uint8 blocks, shape) from a GGUF file."""
    if form not in _FORMS:
        raise ValueError(f"weight form must be one of {', '.join(_FORMS)}, got {form!r}")
    if isinstance(source, tuple):
        return from_gguf_blocks(*source, form)
    w = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.asarray(source, dtype=np.float32))
    return {"int4": quantize_int4, "int8": quantize_int8, "bf16": Bf16Weight, "f16": F16Weight}[form](w)


_NUMBERS = {Int4Weight: ("codes", "scales", "mins"), Int8Weight: ("values", "scales"), Bf16Weight: ("values",),
            F16Weight: ("values",)}


def concat_rows(parts) -> CompactWeight:
    """Weights of one form stacked along N (a merged q|k|v or gate|up product). The parts then
    hold views of the merged numbers (one copy in memory), and merging the same parts again
    gives the same weight (the compiled step and the graphs share it)."""
    first = parts[0]
    if first.merged is not None and len(first.merged[0]) == len(parts) \
            and all(ref() is p for ref, p in zip(first.merged[0], parts)):
        return first.merged[1]
    if not all(type(p) is type(first) for p in parts):
        raise TypeError("cannot merge weights of different forms into one product")
    fields = _NUMBERS[type(first)]
    if any(getattr(p, f) is None for p in parts for f in fields):  # packed for torch already
        raise ValueError("cannot merge weights whose numbers were dropped after packing")
    merged = type(first).__new__(type(first))
    merged.shape = (sum(p.shape[0] for p in parts), first.shape[1])
    merged._packed = None
    for f in fields:
        whole = torch.cat([getattr(p, f) for p in parts])
        setattr(merged, f, whole)
        start = 0
        for p in parts:
            setattr(p, f, whole[start:start + p.shape[0]])
            start += p.shape[0]
    first.merged = ([weakref.ref(p) for p in parts], merged)  # weak: released parts go at once, no cycle
    return merged
