"""The reference backend: plain numpy, float32. This file is the definition of every op;
faster backends are tested against it."""

from __future__ import annotations

import math

import numpy as np

from ..engine.kv_cache import cache_index, release_pages
from ..graph import Node


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[rows, heads*d] -> [heads, rows, d]"""
    return x.reshape(x.shape[0], heads, -1).transpose(1, 0, 2)


def _softmax_attend(q, k, v, bias) -> np.ndarray:
    """q [H, n, d], k/v [H, m, d], bias broadcastable to [H, n, m] (0 or -inf) -> [n, H*d]."""
    scores = (q @ k.transpose(0, 2, 1)) * np.float32(1.0 / math.sqrt(q.shape[-1])) + bias
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.astype(np.float32) @ v
    return out.transpose(1, 0, 2).reshape(q.shape[1], -1)


def _expand_kv(x: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """Grouped-query attention: query head h reads kv head h // (heads / kv_heads)."""
    return np.repeat(_heads(x, kv_heads), heads // kv_heads, axis=0)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float):
    """cos and sin [rows, head_dim] in float32, computed as transformers' Llama does."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    freqs = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def op_linear(node, x, w, *extra):
    a = node.attrs
    rest = list(extra)  # bias [out], residual [rows, out], norm [in]: those present, in that order
    bias = rest.pop(0) if a["bias"] else None
    residual = rest.pop(0) if a["residual"] else None
    if a["norm"]:
        x = rms_norm(x, rest.pop(0), a["eps"])
    if a["gated"]:
        k = w.shape[1]
        x = silu(x[:, :k]) * x[:, k:]
    if a["batch_invariant"] and len(x) != 2:  # as the torch backend: rows in pairs, alike in any batch
        pairs = [x[i:i + 2] if i + 1 < len(x) else np.repeat(x[i:], 2, axis=0) for i in range(0, len(x), 2)]
        out = np.concatenate([p @ w.T for p in pairs])[:len(x)]
    else:
        out = x @ w.T
    for e in (bias, residual):
        if e is not None:
            out = out + e
    return gelu_tanh(out) if a["gelu"] else out


def op_attention(node: Node, q, k, v, key_mask=None):
    a = node.attrs
    heads, kv_heads, block = a["num_heads"], a["num_kv_heads"], a["block"]
    outs = []
    for s in range(q.shape[0] // block):
        rows = slice(s * block, (s + 1) * block)
        bias = np.zeros((block, block), np.float32)
        if a["causal"]:
            bias = np.where(np.tril(np.ones((block, block), bool)), 0.0, -np.inf).astype(np.float32)
        if key_mask is not None:
            bias = bias + np.where(key_mask[s] > 0, 0.0, -np.inf).astype(np.float32)[None, :]
        outs.append(_softmax_attend(_heads(q[rows], heads), _expand_kv(k[rows], heads, kv_heads),
                                    _expand_kv(v[rows], heads, kv_heads), bias))
    return np.concatenate(outs, axis=0)


def op_cached_attention(node: Node, q, k, v, k_cache, v_cache, block_table, slots, positions):
    a = node.attrs
    heads, kv_heads = a["num_heads"], a["num_kv_heads"]
    if a["rope_theta"] is not None:
        d = q.shape[1] // heads
        q, k = rotate(q, positions, d, a["rope_theta"]), rotate(k, positions, d, a["rope_theta"])
    page_size = k_cache.shape[1]
    at = cache_index(block_table, slots, positions, page_size)
    k_cache[at] = k
    v_cache[at] = v
    out = np.empty_like(q)
    for i, (slot, pos) in enumerate(zip(slots, positions)):
        seq = cache_index(block_table, np.full(pos + 1, slot), np.arange(pos + 1), page_size)
        keys = _expand_kv(k_cache[seq], heads, kv_heads)
        values = _expand_kv(v_cache[seq], heads, kv_heads)
        out[i] = _softmax_attend(_heads(q[i : i + 1], heads), keys, values, np.float32(0))[0]
    return out


def op_rope(node: Node, x, positions=None):
    if positions is None:
        positions = np.arange(x.shape[0])
    return rotate(x, positions, node.attrs["head_dim"], node.attrs["theta"])


def rotate(x, positions, d: int, theta: float):
    """Rotary embedding of x [rows, heads*d] at positions [rows]."""
    cos, sin = rope_tables(positions, d, theta)
    xh = x.reshape(x.shape[0], -1, d)
    rotated = np.concatenate([-xh[..., d // 2:], xh[..., : d // 2]], axis=-1)
    return (xh * cos[:, None, :] + rotated * sin[:, None, :]).reshape(x.shape)


def op_layer_norm(node, x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(node.attrs["eps"])) * w + b


def op_add_layer_norm(node, x, residual, w, b):
    s = x + residual
    return np.concatenate([s, op_layer_norm(node, s, w, b)], axis=1)


def rms_norm(x, w, eps: float):
    ms = (x * x).mean(axis=-1, keepdims=True)
    return w * (x / np.sqrt(ms + np.float32(eps)))


def op_rms_norm(node, x, w):
    return rms_norm(x, w, node.attrs["eps"])


def gelu_tanh(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def silu(x):
    return x / (np.float32(1.0) + np.exp(-x))


def patchify(pixel_values: np.ndarray, patch: int) -> np.ndarray:
    """[images, C, H, W] -> [images * (H/p) * (W/p), C*p*p], rows ordered (c, ky, kx)."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return np.ascontiguousarray(x.transpose(0, 2, 4, 1, 3, 5).reshape(-1, c * patch * patch), dtype=np.float32)


def op_pixel_shuffle(node, x):
    images, s = node.attrs["images"], node.attrs["scale"]
    rows, d = x.shape
    side = int(round((rows // images) ** 0.5))
    g = x.reshape(images, side // s, s, side // s, s, d)  # [img, out_row, dy, out_col, dx, d]
    # SmolVLM's order: each output vector is [dy][dx][d] flattened.
    return g.transpose(0, 1, 3, 2, 4, 5).reshape(node.shape)


def op_scatter_rows(node, base, index, src):
    out = base.copy()
    out[index] = src
    return out


def op_slice(node, x):
    idx = [slice(None)] * x.ndim
    idx[node.attrs["axis"]] = slice(node.attrs["start"], node.attrs["stop"])
    return x[tuple(idx)]


OPS = {
    "linear": op_linear,
    "matmul": lambda n, a, b: a @ b,
    "add": lambda n, a, b: a + b,
    "mul": lambda n, a, b: a * b,
    "bias_add": lambda n, x, b: x + b,
    "gelu": lambda n, x: gelu_tanh(x),
    "silu": lambda n, x: silu(x),
    "swiglu": lambda n, g, u: silu(g) * u,
    "layer_norm": op_layer_norm,
    "add_layer_norm": op_add_layer_norm,
    "rms_norm": op_rms_norm,
    "rope": op_rope,
    "attention": op_attention,
    "cached_attention": op_cached_attention,
    "embedding": lambda n, ids, table: table[ids],
    "scatter_rows": op_scatter_rows,
    "reshape": lambda n, x: x.reshape(n.shape),
    "concat": lambda n, *xs: np.concatenate(xs, axis=n.attrs["axis"]),
    "slice": op_slice,
    "pixel_shuffle": op_pixel_shuffle,
    "patchify": lambda n, x: patchify(x, n.attrs["patch"]),
}


class NumpyBackend:
    """Executes dispatches with numpy. Arrays are float32 / uint32 numpy arrays."""

    name = "numpy"

    def __init__(self, options) -> None:
        self.options = options

    def from_host(self, array: np.ndarray, dtype: str) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.uint32 if dtype == "u32" else np.float32)

    def to_host(self, value) -> np.ndarray:
        return np.asarray(value)

    def write(self, dst: np.ndarray, array, dtype: str) -> None:
        dst[...] = array

    def concat(self, parts: list) -> np.ndarray:
        return np.concatenate(parts)

    def copy(self, value: np.ndarray) -> np.ndarray:
        return value.copy()

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(shape, np.float32)

    # ---- the KV cache's memory (engine/kv_cache.py) --------------------------------------
    def cache_storage(self, shape) -> np.ndarray:
        return np.zeros(shape, np.float32)  # calloc: pages cost RAM once written

    def forget_pages(self, storage: np.ndarray, pages: list[int]) -> None:
        release_pages(storage.ctypes.data, storage[0].nbytes, pages)

    def free_memory(self) -> None:
        return None  # host memory: the cache's budget is address space

    # ---- choosing tokens ------------------------------------------------------------------
    can_capture = False

    def owns(self, value) -> bool:
        return False  # tokens always come from the host

    def sampler(self):
        from ..engine.sampler import HostSampler
        return HostSampler(self)

    def run(self, node: Node, args: list):
        out = OPS[node.op](node, *args)
        return out.astype(np.uint32 if node.dtype == "u32" else np.float32, copy=False)
