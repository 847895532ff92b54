"""The torch backend: the same ops as numpy_backend.py, on torch tensors (CPU or CUDA).

Weights and activations use `options.dtype`; norms, softmax and RoPE tables compute in
float32 and round where transformers rounds (docs/design.md). u32 values are held as int64,
torch's index type. On CUDA, RMSNorm, SwiGLU, RoPE + cache write and decode attention run
as Triton kernels (meganeura/kernels); nothing on the decode path reads the GPU from the
host, so a decode step can be captured as a CUDA graph.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.kv_cache import cache_index, release_pages
from ..graph import Node
from .cpu_weights import CompactWeight, concat_rows, make_weight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, heads*d] -> [heads, rows, d]"""
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def _sdpa(q, k, v, heads, kv_heads, mask=None, causal=False) -> torch.Tensor:
    """q [..., n, H*d], k/v [..., m, KV*d] with a leading batch dim -> [..., n, H*d]."""
    b, n, _ = q.shape
    m = k.shape[1]
    q = q.reshape(b, n, heads, -1).transpose(1, 2)
    k = k.reshape(b, m, kv_heads, -1).transpose(1, 2)
    v = v.reshape(b, m, kv_heads, -1).transpose(1, 2)
    gqa = {}
    if kv_heads != heads:  # query head h reads kv head h // group
        # flash attention reads the shared kv heads itself; masked or fp32 CUDA attention would
        # fall back to the math kernel (an [H, n, n] score matrix): those get repeated heads
        if mask is None and not (q.is_cuda and q.dtype == torch.float32):
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
    return out.transpose(1, 2).reshape(b, n, -1)


def op_attention(node: Node, q, k, v, key_mask=None):
    a = node.attrs
    block = a["block"]
    shape = (-1, block, q.shape[1])
    mask = None
    if key_mask is not None:
        mask = (key_mask > 0)[:, None, None, :]  # [blocks, 1, 1, block]
    out = _sdpa(q.reshape(shape), k.reshape(-1, block, k.shape[1]), v.reshape(-1, block, v.shape[1]),
                a["num_heads"], a["num_kv_heads"], mask=mask, causal=a["causal"])
    return out.reshape(q.shape)


@functools.cache
def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _fast(x: torch.Tensor) -> bool:
    """Use the Triton kernels: on CUDA, when triton is installed."""
    return x.is_cuda and _triton()


def _kernel_head_dim(d: int) -> bool:
    return d >= 16 and d & (d - 1) == 0  # tl.dot and tl.arange need a power of two >= 16


@functools.cache
def _inv_freq(theta: float, d: int, device: torch.device) -> torch.Tensor:
    """RoPE inverse frequencies [d/2], float32, computed as transformers computes them."""
    return torch.from_numpy(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).to(device)


def rope_tables(positions, d: int, theta: float, dtype):
    """cos and sin [rows, 1, d] of each row's position, rounded to dtype as transformers does."""
    freqs = positions.to(torch.float32)[:, None] * _inv_freq(theta, d, positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def rotate(x, positions, d: int, theta: float, tables=None):
    """Rotate-half RoPE of x [rows, heads*d]; cos/sin rounded to x's dtype and each product
    rounded, as transformers does in bf16. `tables`: rope_tables already made for positions."""
    cos, sin = tables or rope_tables(positions, d, theta, x.dtype)
    xh = x.reshape(x.shape[0], -1, d)
    rotated = torch.cat([-xh[..., d // 2:], xh[..., : d // 2]], dim=-1)
    return (xh * cos + rotated * sin).reshape(x.shape)


def op_rope(node: Node, x, positions=None):
    if positions is None:
        positions = torch.arange(x.shape[0], device=x.device)
    return rotate(x, positions, node.attrs["head_dim"], node.attrs["theta"])


def op_cached_attention(node: Node, q, k, v, k_cache, v_cache, block_table, slots, positions):
    a = node.attrs
    heads, kv_heads, theta, mode = a["num_heads"], a["num_kv_heads"], a["rope_theta"], a["mode"]
    d = q.shape[1] // heads
    if not q.is_cuda:
        return _cached_attention_cpu(q, k, v, k_cache, v_cache, block_table, slots, positions, heads, kv_heads,
                                     theta, mode)
    kernels = _fast(q) and _kernel_head_dim(d)
    if kernels and theta is not None:
        from ..kernels.rope_cache import rope_cache_write
        q = rope_cache_write(q, k, v, k_cache, v_cache, block_table, slots, positions, _inv_freq(theta, d, q.device),
                             heads, kv_heads, keys_out=mode == "prefill")
        if mode == "prefill":  # the rotated keys, also written out beside the cache
            q, k = q
    else:
        if theta is not None:  # one cos/sin table for q and k
            tables = rope_tables(positions, d, theta, q.dtype)
            q, k = rotate(q, positions, d, theta, tables), rotate(k, positions, d, theta, tables)
        at = cache_index(block_table, slots, positions, k_cache.shape[1])
        k_cache[at] = k.to(k_cache.dtype)
        v_cache[at] = v.to(v_cache.dtype)
    if mode == "prefill":  # rows are positions 0..n-1 of one sequence: causal flash attention
        return _sdpa(q[None], k[None], v[None], heads, kv_heads, causal=True)[0]
    if mode == "extend" and kernels:
        from ..kernels.extend_attention import extend_attention
        return extend_attention(q, k_cache, v_cache, block_table, slots, positions, heads, kv_heads)
    if mode == "extend":
        return attend_slot(q, k_cache, v_cache, block_table, slots[:1], positions, heads, kv_heads, q.is_cuda)
    if mode == "decode" and kernels:
        from ..kernels.decode_attention import decode_attention
        return decode_attention(q, k_cache, v_cache, block_table, slots, positions, heads, kv_heads)
    if mode == "decode" and q.is_cuda:  # no kernel for this head size: stay recordable
        return attend_cache_masked(q, k_cache, v_cache, block_table, slots, positions, heads, kv_heads)
    return _attend_groups(q, k_cache, v_cache, _StepIndex(block_table, slots, positions, k_cache.shape[1], d, None,
                                                          q.dtype).groups, heads, kv_heads)


def attend_cache_masked(q, k_cache, v_cache, block_table, slots, positions, heads, kv_heads):
    """One row per sequence over every token its slot can hold, masked past its position on
    the device: slower than the decode kernel, but nothing is read back to the host."""
    page_size = k_cache.shape[1]
    tokens = torch.arange(block_table.shape[1] * page_size, device=q.device)
    at = cache_index(block_table, slots[:, None], tokens[None, :], page_size)  # [rows, max_seq] each
    keys = tokens[None, :] <= positions[:, None]
    return _sdpa(q[:, None], k_cache[at], v_cache[at], heads, kv_heads, mask=keys[:, None, None, :])[:, 0]


def attend_slot(q, k_cache, v_cache, block_table, slot, positions, heads, kv_heads, recordable: bool):
    """Rows of one sequence (a prefill chunk after cached positions) over that slot's cache,
    each masked past its position. The keys are gathered as far as the rows reach (read on the
    host: free on the CPU) or, `recordable` (CUDA), over the table's columns (the runner binds
    as many as the chunk needs), so nothing is read back and the step can be recorded. `slot`
    is a one-element tensor: a 0-d tensor index is read on the host (.item()), which would
    break a recording."""
    page_size = k_cache.shape[1]
    length = block_table.shape[1] * page_size if recordable else int(positions.max()) + 1
    tokens = torch.arange(length, device=q.device)
    at = cache_index(block_table, slot, tokens, page_size)
    rows, group = q.shape[0], heads // kv_heads
    d = q.shape[1] // heads
    # query head h reads kv head h // group: one attention per kv head over its group's queries
    # stacked as rows, so the keys are never repeated per query head
    q = q.reshape(rows, kv_heads, group, d).permute(1, 2, 0, 3).reshape(1, kv_heads, group * rows, d)
    k, v = (c[at].reshape(length, kv_heads, d).transpose(0, 1)[None].to(q.dtype) for c in (k_cache, v_cache))
    mask = (tokens[None, :] <= positions[:, None]).repeat(group, 1)  # [group * rows, length], group-major like q
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
    return out.reshape(kv_heads, group, rows, d).permute(2, 0, 1, 3).reshape(rows, heads * d)


class _StepIndex:
    """What every layer of one step shares, made once by its first layer (on the CPU): RoPE's cos and
    signed sin for each row, where each row's key and value go in the cache, and (decode) each
    slot's rows and the pages its keys are on. Rebuilt per layer, these were ~2/3 of a decode
    layer's attention time (docs/perf.md)."""

    def __init__(self, block_table, slots, positions, page_size: int, d: int, theta, dtype) -> None:
        self.block_table, self.slots, self.positions, self.page_size = block_table, slots, positions, page_size
        self.tables = None
        if theta is not None:
            cos, sin = rope_tables(positions, d, theta, dtype)
            # rotate-half as a roll: x * cos + roll(x) * [-sin | sin] is x * cos + [-x2 | x1] * sin, bit for bit
            self.tables = cos, torch.cat([-sin[..., : d // 2], sin[..., d // 2:]], dim=-1)
        self.at = cache_index(block_table, slots, positions, page_size)

    @functools.cached_property
    def groups(self) -> list:
        """(rows, pages, length, mask) per slot: rows a slice when the slot has them all; mask
        None for a slot's lone row (it sees every gathered key)."""
        slot_list, pos_list = self.slots.tolist(), self.positions.tolist()
        out = []
        for slot in sorted(set(slot_list)):
            rows = [i for i, s in enumerate(slot_list) if s == slot]
            idx = slice(None) if len(rows) == len(slot_list) else torch.tensor(rows, device=self.slots.device)
            length = max(pos_list[i] for i in rows) + 1
            pages = self.block_table[slot, : -(-length // self.page_size)]  # whole pages: one row gather each
            mask = None
            if len(rows) > 1:
                tokens = torch.arange(length, device=self.slots.device)
                mask = (tokens[None, :] <= self.positions[idx][:, None])[None, None]
            out.append((idx, pages, length, mask))
        return out


_last_step: list = [None, None]  # (key, _StepIndex) of the latest CPU step


def _cpu_step(block_table, slots, positions, page_size: int, d: int, theta, dtype) -> _StepIndex:
    """The step's shared index, reused while the same index tensors hold the same values:
    the runner rewrites its bound inputs in place, which bumps their version counters (the
    key holds the tensors themselves, so their ids cannot be reused meanwhile)."""
    tensors = (block_table, slots, positions)
    try:
        key = (tensors, tuple(t._version for t in tensors), page_size, d, theta, dtype)
    except RuntimeError:  # tensors made under torch.inference_mode keep no version counter
        return _StepIndex(block_table, slots, positions, page_size, d, theta, dtype)
    last_key, step = _last_step
    if last_key is None or not (all(a is b for a, b in zip(last_key[0], tensors)) and last_key[1:] == key[1:]):
        step = _StepIndex(block_table, slots, positions, page_size, d, theta, dtype)
        _last_step[:] = key, step
    return step


def _rotate_cpu(x, tables):
    """Rotate-half RoPE of x [rows, heads*d] with a step's (cos, signed sin): `rotate`'s bits."""
    cos, sin_signed = tables
    d = cos.shape[-1]
    xh = x.reshape(x.shape[0], -1, d)
    return (xh * cos + xh.roll(d // 2, -1) * sin_signed).reshape(x.shape)


def _adjacent(a, b) -> bool:
    """Is b the columns right after a's, in the same storage (q and k sliced from one q|k|v product)?"""
    return (a.stride() == b.stride() and a.stride(1) == 1 and a.dtype == b.dtype
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.shape[1])


def _cached_attention_cpu(q, k, v, k_cache, v_cache, block_table, slots, positions, heads, kv_heads, theta, mode):
    step = _cpu_step(block_table, slots, positions, k_cache.shape[1], q.shape[1] // heads, theta, q.dtype)
    if step.tables is not None and _adjacent(q, k):  # rotated as one [rows, q|k] view: half the ops
        qk = _rotate_cpu(q.as_strided((q.shape[0], q.shape[1] + k.shape[1]), q.stride()), step.tables)
        q, k = qk[:, : q.shape[1]], qk[:, q.shape[1]:]
    elif step.tables is not None:
        q, k = _rotate_cpu(q, step.tables), _rotate_cpu(k, step.tables)
    k_cache.index_put_(step.at, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.index_put_(step.at, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))
    if mode == "prefill":  # rows are positions 0..n-1 of one sequence: causal flash attention
        return _sdpa(q[None], k[None], v[None], heads, kv_heads, causal=True)[0]
    if mode == "extend":
        return attend_slot(q, k_cache, v_cache, block_table, slots[:1], positions, heads, kv_heads, False)
    return _attend_groups(q, k_cache, v_cache, step.groups, heads, kv_heads)


def _attend_groups(q, k_cache, v_cache, groups, heads: int, kv_heads: int):
    """Any mix of rows (a decode step): one attention per slot, its keys gathered from its pages
    only as far as its rows reach (the slots are read on the host: free on the CPU).
    (*) in the queries' dtype: a bf16 cache beside float32 rows (4-bit weights' float32
    embeddings with --dtype bfloat16); a no-op when they match."""
    out = None if len(groups) == 1 else torch.empty_like(q)
    for idx, pages, length, mask in groups:
        keys, values = (t.to(q.dtype) for t in _gather_pages(k_cache, v_cache, pages, length))  # (*)
        rows = q if out is None else q[idx]
        if mask is None and q.dtype == torch.float32 and not q.is_cuda:
            got = _attend_one_row(rows, keys, values, heads, kv_heads)
        else:  # (in half precision SDPA keeps the scores in float32)
            got = _sdpa(rows[None], keys[None], values[None], heads, kv_heads, mask=mask)[0]
        if out is None:
            return got
        out[idx] = got
    return out


def _gather_pages(k_cache, v_cache, pages, length: int):
    """The first `length` keys and values [length, KV*d] on `pages`, whole pages gathered. One
    gather where a layer's values sit at a fixed offset from its keys in one storage (the KV
    cache's layout: pages x layers x k|v), else one each."""
    delta = v_cache.storage_offset() - k_cache.storage_offset()
    if (delta <= 0 or k_cache.stride() != v_cache.stride() or k_cache.shape != v_cache.shape or
            k_cache.untyped_storage().data_ptr() != v_cache.untyped_storage().data_ptr()):
        return (c[pages].flatten(0, 1)[:length] for c in (k_cache, v_cache))
    both = k_cache.as_strided((2, *k_cache.shape), (delta, *k_cache.stride()))[:, pages]  # [2, pages, page, KV*d]
    both = both.reshape(2, -1, k_cache.shape[-1])[:, :length]
    return both[0], both[1]


def _attend_one_row(q, keys, values, heads: int, kv_heads: int):
    """One float32 row q [1, H*d] over keys/values [L, KV*d] as two batched products over the kv
    heads (query head h reads kv head h // group): 27 us against SDPA's 46 us at
    this size (150 keys, warm cache)."""
    length, d = keys.shape[0], q.shape[1] // heads
    qh = q.reshape(kv_heads, heads // kv_heads, d)
    scores = torch.bmm(qh, keys.view(length, kv_heads, d).permute(1, 2, 0)).mul_(d ** -0.5)
    return torch.bmm(scores.softmax(-1), values.view(length, kv_heads, d).transpose(0, 1)).reshape(1, -1)


def op_linear(node: Node, x, w, *extra):
    a = node.attrs
    rest = list(extra)  # bias, residual, norm: those present, in that order
    bias = rest.pop(0) if a["bias"] else None
    residual = rest.pop(0) if a["residual"] else None
    norm = rest.pop(0) if a["norm"] else None
    if _fast(x) and bias is None and not a["gelu"] and x.stride(-1) == 1:
        # the skinny-product kernel: one row, or a decode step's few rows, each computed as it
        # is alone (cuBLAS picks its kernel, and so its summation order, by the row count)
        from ..kernels.gemv import INVARIANT_ROWS, gemv
        if x.shape[0] == 1 or (a["batch_invariant"] and x.shape[0] <= INVARIANT_ROWS):
            return gemv(x, w, residual, norm, a["eps"], a["gated"], float_out=a["float_out"])
    if norm is not None:
        x = rms_norm(x, norm, a["eps"])
    if a["gated"]:
        x = swiglu(x[:, : w.shape[1]], x[:, w.shape[1]:])
    if a["gelu"]:
        if bias is not None and x.is_cuda:  # the product's epilogue (cuBLASLt, tanh GELU): no extra pass
            return torch._addmm_activation(bias, x, w.T, use_gelu=True)
        # (on the CPU `_addmm_activation` applies the erf GELU: not SigLIP's)
        return F.gelu(x @ w.T if bias is None else torch.addmm(bias, x, w.T), approximate="tanh")
    if isinstance(w, CompactWeight):
        return _compact_linear(x, w, bias, residual, a["float_out"], a["batch_invariant"])

    def product(rows):
        if a["float_out"] and rows.dtype != torch.float32:
            out = _product_f32(rows, w)
            return out if bias is None else out + bias.float()
        return rows @ w.T if bias is None else torch.addmm(bias, rows, w.T)

    if a["batch_invariant"] and not x.is_cuda and x.shape[0] != 2:
        # The CPU's BLAS takes another kernel for one row than for several, and several rows'
        # results can depend on the row count: products of exactly two rows (a lone row is
        # doubled) give every row the same arithmetic whatever else is in the batch.
        pairs = [x[i:i + 2] if i + 1 < len(x) else x[i:].repeat(2, 1) for i in range(0, len(x), 2)]
        out = torch.cat([product(p) for p in pairs])[:len(x)]
    else:
        out = product(x)
    # the residual is added to the rounded product, as transformers adds in the model's dtype
    return out if residual is None else out.add_(residual)


def _compact_linear(x, w: CompactWeight, bias, residual, float_out: bool, invariant: bool):
    """Compact weights on the CPU (cpu_weights.py). Their kernels compute each row alone (the
    same bits for 1..40 rows, tested), so no row pairs here (F16Weight's fallback pairs its own)."""
    out = w.product(x, invariant=invariant)  # in the kernel's own dtype
    if residual is not None and bias is None and not float_out and residual.dtype in (out.dtype, torch.float32):
        # one op: rounding the product to the model's dtype first would change nothing here
        return residual + out
    out = out.to(torch.float32 if float_out else x.dtype)
    if bias is not None:
        out = out + bias
    # the residual is added to the rounded product, as transformers adds in the model's dtype
    return out if residual is None else out.add_(residual)


def _product_f32(x, w):
    """x @ w.T in float32 from half-precision operands: accumulated and returned in float32
    (cuBLAS's out_dtype on CUDA; upcast operands elsewhere)."""
    if x.is_cuda and _mm_out_dtype(x.device):
        return torch.mm(x, w.T, out_dtype=torch.float32)
    return x.float() @ w.float().T


@functools.cache
def _mm_out_dtype(device: torch.device) -> bool:
    try:
        a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def rms_norm(x, w, eps: float):
    if _fast(x) and x.stride(-1) == 1:
        from ..kernels.rms_norm import rms_norm as kernel
        return kernel(x, w, eps)
    if x.dtype == w.dtype == torch.float32:  # one op; the same bits as the three-step formula below
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)  # rounded before the weight, as transformers does


def swiglu(g, u):
    if _fast(g) and g.stride(-1) == 1 and u.stride(-1) == 1:
        from ..kernels.swiglu import swiglu as kernel
        return kernel(g, u)
    return F.silu(g) * u


def op_layer_norm(node: Node, x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, node.attrs["eps"])  # fp32 statistics inside


def op_add_layer_norm(node: Node, x, residual, w, b):
    if _fast(x) and x.stride(-1) == residual.stride(-1) == 1:
        from ..kernels.add_layer_norm import add_layer_norm
        return add_layer_norm(x, residual, w, b, node.attrs["eps"])
    s = x + residual
    return torch.cat([s, F.layer_norm(s, (s.shape[-1],), w, b, node.attrs["eps"])], dim=1)


def op_pixel_shuffle(node: Node, x):
    images, s = node.attrs["images"], node.attrs["scale"]
    rows, d = x.shape
    side = int(round((rows // images) ** 0.5))
    g = x.reshape(images, side // s, s, side // s, s, d)
    return g.permute(0, 1, 3, 2, 4, 5).reshape(node.shape)


def op_patchify(node: Node, x):
    n, c, h, w = x.shape
    p = node.attrs["patch"]
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(node.shape)


def op_concat(node: Node, *xs):
    if isinstance(xs[0], CompactWeight) and node.attrs["axis"] == 0:  # a merged q|k|v weight
        return concat_rows(xs)
    return torch.cat(xs, dim=node.attrs["axis"])


def op_scatter_rows(node: Node, base, index, src):
    out = base.clone()
    out[index] = src.to(out.dtype)
    return out


OPS = {
    "linear": op_linear,
    "matmul": lambda n, a, b: a @ b,
    "add": lambda n, a, b: a + b,
    "mul": lambda n, a, b: a * b,
    "bias_add": lambda n, x, b: x + b,
    "gelu": lambda n, x: F.gelu(x, approximate="tanh"),
    "silu": lambda n, x: F.silu(x),
    "swiglu": lambda n, g, u: swiglu(g, u),
    "layer_norm": op_layer_norm,
    "add_layer_norm": op_add_layer_norm,
    "rms_norm": lambda n, x, w: rms_norm(x, w, n.attrs["eps"]),
    "rope": op_rope,
    "attention": op_attention,
    "cached_attention": op_cached_attention,
    "embedding": lambda n, ids, table: table[ids],
    "scatter_rows": op_scatter_rows,
    "reshape": lambda n, x: x.reshape(n.shape),
    "concat": op_concat,
    "slice": lambda n, x: x.narrow(n.attrs["axis"], n.attrs["start"], n.attrs["stop"] - n.attrs["start"]),
    "pixel_shuffle": op_pixel_shuffle,
    "patchify": op_patchify,
}


@functools.cache
def _large_frees_go_back_to_the_os() -> None:
    """glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed,
    after which large tensors come from its heap and their memory stays with the process once
    freed: packing the weights at the first product and the first prefill's activations left
    ~350 MB there (peak RSS 0.94 GB for SmolLM2 4-bit; ~0.67 GB with the threshold fixed).
    Blocks of 4 MiB or more are mapped and unmapped whole (1 MiB also mapped a prefill's
    activations: float32 prefill 15% slower, docs/perf.md)."""
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): its allocator returns large blocks already
        return
    libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD


class TorchBackend:
    name = "torch"

    def __init__(self, options) -> None:
        self.options = options
        self.device = torch.device(options.device)
        if options.dtype not in DTYPES:
            raise ValueError(f"torch backend: dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}")
        self.dtype = DTYPES[options.dtype]
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU")
        self._staging: dict[tuple, tuple] = {}  # (device buffer, source dtype) -> (pinned buffer, copy event)
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            _large_frees_go_back_to_the_os()

    def from_host(self, array, dtype: str) -> torch.Tensor:
        if isinstance(array, torch.Tensor):  # copied: the caller may reuse it, a recording may refill ours
            return array.to(self.device, torch.int64 if dtype == "u32" else self.dtype, copy=True)
        a = np.ascontiguousarray(np.asarray(array).astype(np.int64) if dtype == "u32" else array)
        with warnings.catch_warnings():
            # Memory-mapped weights are read-only; sharing them (no copy) is the point, and
            # nothing writes to parameters.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        if dtype == "u32":
            return t.to(self.device, torch.int64)
        return t.to(self.device, self.dtype)

    def weight(self, source, form: str) -> CompactWeight:
        if self.device.type != "cpu":
            raise ValueError(f"{form} weights run on the CPU only (this backend runs on {self.device})")
        return make_weight(source, form)

    @property
    def can_capture(self) -> bool:
        return self.device.type == "cuda"

    def sampler(self):
        """On a GPU, tokens are chosen there (one small copy back, not a logits row each);
        on the CPU the host sampler is as fast and keeps numpy's random stream."""
        if self.device.type == "cuda":
            from .torch_sampling import DeviceSampler
            return DeviceSampler(self)
        from ..engine.sampler import HostSampler
        return HostSampler(self)

    def write(self, dst: torch.Tensor, array, dtype: str) -> None:
        """Copy into an existing device buffer (the inputs of a recorded run) without waiting
        for the GPU: device arrays directly, host arrays through a pinned staging buffer."""
        if isinstance(array, torch.Tensor) and array.device == dst.device:
            dst.copy_(array)
            return
        src = array if isinstance(array, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(array, dtype=np.int64) if dtype == "u32" else np.ascontiguousarray(array))
        if not dst.is_cuda:
            dst.copy_(src)
            return
        key = (dst.data_ptr(), src.dtype)
        staged = self._staging.get(key)
        if staged is None or staged[0].shape != src.shape:
            staged = self._staging[key] = (torch.empty(src.shape, dtype=src.dtype, pin_memory=True), torch.cuda.Event())
        buffer, copied = staged
        copied.synchronize()  # the previous copy out of this staging buffer is done
        buffer.copy_(src)
        dst.copy_(buffer, non_blocking=True)  # a dtype change (fp32 pixels -> bf16) happens on the GPU
        copied.record(torch.cuda.current_stream(dst.device))

    def capture(self, fn):
        """Record fn's kernels as one CUDA graph; returns the replay callable. Replays are
        idempotent runs of the same step, so the warm-up and the recording may run it again."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()  # warm-up off the main stream, as torch asks (cuBLAS workspaces)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # one pool: recordings never run at once
            fn()
        return graph.replay

    def owns(self, value) -> bool:
        """Is value already one of this backend's arrays (e.g. tokens chosen on the device)?"""
        if not isinstance(value, torch.Tensor) or value.device.type != self.device.type:
            return False
        return self.device.index is None or value.device.index == self.device.index  # "cuda" means any

    def to_host(self, value: torch.Tensor) -> np.ndarray:
        if value.dtype == torch.int64:
            return value.cpu().numpy().astype(np.uint32)
        return value.float().cpu().numpy()

    def concat(self, parts: list) -> torch.Tensor:
        return torch.cat(parts)

    def copy(self, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- the KV cache's memory (engine/kv_cache.py) --------------------------------------
    def cache_storage(self, shape) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        # a large empty tensor is fresh mmap'd memory: zeros that cost RAM only once written
        t = torch.empty(shape, dtype=self.dtype)
        return t if t.nbytes >= 2**26 else t.zero_()

    def forget_pages(self, storage: torch.Tensor, pages: list[int]) -> None:
        if storage.device.type == "cpu":
            release_pages(storage.data_ptr(), storage[0].nbytes, pages)

    def free_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.mem_get_info(self.device)[0]

    @torch.no_grad()
    def run(self, node: Node, args: list):
        return OPS[node.op](node, *args)
