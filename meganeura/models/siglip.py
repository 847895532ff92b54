"""SigLIP-style vision encoder as used by SmolVLM2: config, host-side patch layout, graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.numpy_backend import patchify  # noqa: F401  (host-side, for `image_patches` inputs)
from ..graph import Graph, Node
from .fields import json_object, read_fields

PREFIX = "model.vision_model."


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 512
    patch_size: int = 16
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "VisionConfig":
        """From a config's "vision_config", checked; `where` prefixes key names in errors."""
        act = json_object(d, where).get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"{where}hidden_act {act!r:.40} is not supported (only the tanh GELU)")
        cfg = cls(**read_fields(cls, d, where))
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"{where}image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{where}hidden_size {cfg.hidden_size} must be a multiple of num_attention_heads "
                             f"{cfg.num_attention_heads}")
        return cfg


# ---- host-side layout (numpy): masks -> position ids -------------------

def patch_mask(pixel_attention_mask: np.ndarray, patch: int) -> np.ndarray:
    """A patch is valid when any of its pixels is: [images, H, W] -> bool [images, H/p, W/p]."""
    n, h, w = pixel_attention_mask.shape
    m = pixel_attention_mask.reshape(n, h // patch, patch, w // patch, patch)
    return m.any(axis=(2, 4))


def position_ids(mask: np.ndarray, patches_per_side: int) -> np.ndarray:
    """Position ids [images, h*w] for each patch grid: the valid sub-grid's fractional
    coordinates are bucketed onto the full side x side table, as transformers does for
    images smaller than the padded size (padded patches get 0)."""
    n, h, w = mask.shape
    boundaries = np.arange(1 / patches_per_side, 1.0, 1 / patches_per_side).astype(np.float32)
    out = np.zeros((n, h * w), np.int64)
    for i in range(n):
        rows, cols = int(mask[i, :, 0].sum()), int(mask[i, 0, :].sum())
        if not rows or not cols:
            continue  # an all-padding image: every id stays 0
        clamp = np.float32(1 - 1e-6)
        fr = np.minimum(np.arange(h, dtype=np.float32) * np.float32(1.0 / rows), clamp)
        fc = np.minimum(np.arange(w, dtype=np.float32) * np.float32(1.0 / cols), clamp)
        br = np.searchsorted(boundaries, fr, side="right")
        bc = np.searchsorted(boundaries, fc, side="right")
        ids = (br[:, None] * patches_per_side + bc[None, :]).reshape(-1)
        out[i] = np.where(mask[i].reshape(-1), ids, 0)
    return out


# ---- graph ----------------------------------------------------------------------------------

def _param(g: Graph, name: str, shape) -> Node:
    return g.parameter(PREFIX + name, shape)


def _norm(g: Graph, cfg: VisionConfig, name: str, x: Node) -> Node:
    d = [cfg.hidden_size]
    return g.layer_norm(x, _param(g, name + ".weight", d), _param(g, name + ".bias", d), cfg.layer_norm_eps)


def _proj(g: Graph, name: str, x: Node, out: int, inp: int) -> Node:
    return g.bias_add(g.linear(x, _param(g, name + ".weight", [out, inp])), _param(g, name + ".bias", [out]))


def vision_encoder(g: Graph, cfg: VisionConfig, patches: Node, images: int, positions: Node | None = None,
                   key_mask: Node | None = None) -> Node:
    """patches [images*n, patch_dim] -> post-norm hidden states [images*n, hidden].

    positions (u32 [images*n]) picks rows of the position table; None means every image is a
    full grid (position i for patch i). key_mask [images, n] hides padded patches."""
    d = cfg.hidden_size
    kernel = _param(g, "embeddings.patch_embedding.weight", [d, cfg.num_channels, cfg.patch_size, cfg.patch_size])
    x = g.linear(patches, g.reshape(kernel, [d, cfg.patch_dim]))
    x = g.bias_add(x, _param(g, "embeddings.patch_embedding.bias", [d]))
    table = _param(g, "embeddings.position_embedding.weight", [cfg.num_patches, d])
    per_image = patches.shape[0] // images
    if positions is not None:
        x = g.add(x, g.embedding(positions, table))
    elif per_image == cfg.num_patches:  # full grids: the table itself, once per image
        x = g.add(x, table if images == 1 else g.concat([table] * images))
    else:
        raise ValueError(f"vision encoder: {per_image} patches per image need explicit position ids "
                         f"(a full image has {cfg.num_patches})")
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        h = _norm(g, cfg, p + "layer_norm1", x)
        q, k, v = (_proj(g, f"{p}self_attn.{n}_proj", h, d, d) for n in "qkv")
        a = g.full_attention(q, k, v, cfg.num_attention_heads, block=per_image, key_mask=key_mask)
        x = g.add(x, _proj(g, p + "self_attn.out_proj", a, d, d))
        h = _norm(g, cfg, p + "layer_norm2", x)
        h = g.gelu(_proj(g, p + "mlp.fc1", h, cfg.intermediate_size, d))
        x = g.add(x, _proj(g, p + "mlp.fc2", h, d, cfg.intermediate_size))
    return _norm(g, cfg, "post_layernorm", x)
