"""The torch backend: the same ops as numpy_backend.py, on torch tensors (CPU or CUDA).

Weights and activations use `options.dtype`; norms, softmax and RoPE tables compute in
float32 and cast back. u32 values are held as int64, torch's index type.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..graph import Node

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
    if kv_heads != heads:  # query head h reads kv head h // group
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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


def op_cached_attention(node: Node, q, k, v, k_cache, v_cache, slots, positions):
    a = node.attrs
    k_cache[slots, positions] = k.to(k_cache.dtype)
    v_cache[slots, positions] = v.to(v_cache.dtype)
    out = torch.empty_like(q)
    slot_list = slots.tolist()
    pos = positions
    for slot in sorted(set(slot_list)):  # one attention per sequence (prefill: exactly one)
        rows = [i for i, s in enumerate(slot_list) if s == slot]
        idx = torch.tensor(rows, device=q.device) if len(rows) != len(slot_list) else slice(None)
        length = int(pos[idx].max()) + 1
        mask = torch.arange(length, device=q.device)[None, :] <= pos[idx][:, None]  # [rows, length]
        out[idx] = _sdpa(q[idx][None], k_cache[slot, :length][None], v_cache[slot, :length][None],
                         a["num_heads"], a["num_kv_heads"], mask=mask[None, None])[0]
    return out


def op_rope(node: Node, x, positions=None):
    d, theta = node.attrs["head_dim"], node.attrs["theta"]
    if positions is None:
        positions = torch.arange(x.shape[0], device=x.device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    xh = x.reshape(x.shape[0], -1, d).float()
    rotated = torch.cat([-xh[..., d // 2:], xh[..., : d // 2]], dim=-1)
    return (xh * cos + rotated * sin).reshape(x.shape).to(x.dtype)


def op_linear(node: Node, x, w, *extra):
    if len(extra) == 0:
        return x @ w.T
    if len(extra) == 2:  # bias and residual
        return torch.addmm(extra[1], x, w.T).add_(extra[0])
    return torch.addmm(extra[0], x, w.T)  # bias broadcasts; so does a residual [rows, out]


def op_rms_norm(node: Node, x, w):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + node.attrs["eps"])
    return (w.float() * y).to(x.dtype)


def op_layer_norm(node: Node, x, w, b):
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), node.attrs["eps"]).to(x.dtype)


def op_pixel_shuffle(node: Node, x):
    images, s = node.attrs["images"], node.attrs["scale"]
    rows, d = x.shape
    side = int(round((rows // images) ** 0.5))
    g = x.reshape(images, side // s, s, side // s, s, d)
    return g.permute(0, 1, 3, 2, 4, 5).reshape(node.shape)


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
    "swiglu": lambda n, g, u: F.silu(g) * u,
    "layer_norm": op_layer_norm,
    "rms_norm": op_rms_norm,
    "rope": op_rope,
    "attention": op_attention,
    "cached_attention": op_cached_attention,
    "embedding": lambda n, ids, table: table[ids],
    "scatter_rows": op_scatter_rows,
    "reshape": lambda n, x: x.reshape(n.shape),
    "concat": lambda n, *xs: torch.cat(xs, dim=n.attrs["axis"]),
    "slice": lambda n, x: x.narrow(n.attrs["axis"], n.attrs["start"], n.attrs["stop"] - n.attrs["start"]),
    "pixel_shuffle": op_pixel_shuffle,
}


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

    def from_host(self, array, dtype: str) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            t = array
        else:
            a = np.ascontiguousarray(np.asarray(array).astype(np.int64) if dtype == "u32" else array)
            with warnings.catch_warnings():
                # Memory-mapped weights are read-only; sharing them (no copy) is the point, and
                # nothing writes to parameters.
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(a)
        if dtype == "u32":
            return t.to(self.device, torch.int64)
        return t.to(self.device, self.dtype)

    def to_host(self, value: torch.Tensor) -> np.ndarray:
        if value.dtype == torch.int64:
            return value.cpu().numpy().astype(np.uint32)
        return value.float().cpu().numpy()

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def run(self, node: Node, args: list):
        return OPS[node.op](node, *args)
