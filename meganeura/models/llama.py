"""Llama-style decoder (SmolLM2, and SmolVLM2's text model): config and graph builders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..engine.kv_cache import CacheLayout
from ..graph import Graph, Node
from .fields import json_object, read_fields


def read_config(config: dict | str | Path) -> dict:
    """A config.json as a dict: given as a dict, the file, or its folder."""
    if isinstance(config, dict):
        return config
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read a config from {path}: {e}") from None


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "TextConfig":
        """From a Hugging Face (llama) config dict, checked; unknown keys are ignored. `where`
        prefixes key names in errors (e.g. "text_config.")."""
        d = dict(json_object(d, where))
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads")
        cfg = cls(**read_fields(cls, d, where))
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        if cfg.hidden_size % heads or cfg.head_dim % 2:  # RoPE rotates the two halves of each head
            raise ValueError(f"{where}hidden_size {cfg.hidden_size} must be num_attention_heads {heads} "
                             "times an even head size")
        if heads % kv_heads:
            raise ValueError(f"{where}num_attention_heads {heads} must be a multiple of num_key_value_heads "
                             f"{kv_heads}")
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise ValueError(f"{where}head_dim {d['head_dim']!r:.30} != hidden_size / num_attention_heads = "
                             f"{cfg.head_dim}: not supported")
        return cfg


@dataclass(frozen=True)
class DecoderNames:
    """Where the decoder's parameters live in a checkpoint."""

    model: str           # "model." (LlamaForCausalLM) or "model.text_model." (SmolVLM)
    lm_head: str = "lm_head.weight"

    def layer(self, i: int) -> str:
        return f"{self.model}layers.{i}."


def _layer(g: Graph, cfg: TextConfig, p: str, x: Node, positions: Node | None, attend) -> Node:
    """One pre-norm decoder layer; `attend(q, k, v)` is full causal or KV-cached attention."""
    h = g.rms_norm(x, g.parameter(p + "input_layernorm.weight", [cfg.hidden_size]), cfg.rms_norm_eps)
    q = g.linear(h, g.parameter(p + "self_attn.q_proj.weight", [cfg.hidden_size, cfg.hidden_size]))
    k = g.linear(h, g.parameter(p + "self_attn.k_proj.weight", [cfg.kv_dim, cfg.hidden_size]))
    v = g.linear(h, g.parameter(p + "self_attn.v_proj.weight", [cfg.kv_dim, cfg.hidden_size]))
    q = g.rope(q, positions, cfg.head_dim, cfg.rope_theta)
    k = g.rope(k, positions, cfg.head_dim, cfg.rope_theta)
    a = attend(q, k, v)
    x = g.add(x, g.linear(a, g.parameter(p + "self_attn.o_proj.weight", [cfg.hidden_size, cfg.hidden_size])))
    h = g.rms_norm(x, g.parameter(p + "post_attention_layernorm.weight", [cfg.hidden_size]), cfg.rms_norm_eps)
    gate = g.linear(h, g.parameter(p + "mlp.gate_proj.weight", [cfg.intermediate_size, cfg.hidden_size]))
    up = g.linear(h, g.parameter(p + "mlp.up_proj.weight", [cfg.intermediate_size, cfg.hidden_size]))
    down = g.parameter(p + "mlp.down_proj.weight", [cfg.hidden_size, cfg.intermediate_size])
    return g.add(x, g.linear(g.mul(g.silu(gate), up), down))


def embed_tokens(g: Graph, cfg: TextConfig, names: DecoderNames, token_ids: Node) -> Node:
    return g.embedding(token_ids, g.parameter(names.model + "embed_tokens.weight",
                                              [cfg.vocab_size, cfg.hidden_size]))


def lm_head(g: Graph, cfg: TextConfig, names: DecoderNames, hidden: Node) -> Node:
    """Final norm and vocabulary projection (float32 logits); a tied head reuses the embedding table."""
    h = g.rms_norm(hidden, g.parameter(names.model + "norm.weight", [cfg.hidden_size]), cfg.rms_norm_eps)
    name = names.model + "embed_tokens.weight" if cfg.tie_word_embeddings else names.lm_head
    return g.linear(h, g.parameter(name, [cfg.vocab_size, cfg.hidden_size]), float_out=True)


def decoder_full(g: Graph, cfg: TextConfig, names: DecoderNames, embeds: Node, positions: Node) -> Node:
    """All layers over a whole sequence with causal attention and no cache -> hidden states."""
    x = embeds
    for i in range(cfg.num_hidden_layers):
        x = _layer(g, cfg, names.layer(i), x, positions,
                   lambda q, k, v: g.causal_attention(q, k, v, cfg.num_attention_heads, cfg.num_key_value_heads))
    return x


def decoder_cached(g: Graph, cfg: TextConfig, names: DecoderNames, embeds: Node, positions: Node,
                   slots: Node, cache: CacheLayout, mode: str = "any") -> Node:
    """All layers for rows at (slot, position), reading and extending the paged KV cache
    (`mode`: see `Graph.cached_attention`)."""
    table = g.input_u32("block_table", [cache.slots, cache.max_blocks])
    x = embeds
    for i in range(cfg.num_hidden_layers):
        k_cache, v_cache = (g.state(name, cache.state_shape) for name in CacheLayout.state_names(names.layer(i)))
        x = _layer(g, cfg, names.layer(i), x, positions,
                   lambda q, k, v: g.cached_attention(q, k, v, k_cache, v_cache, table, slots, positions,
                                                      cfg.num_attention_heads, cfg.num_key_value_heads, mode))
    return x


def build_text_step(g: Graph, cfg: TextConfig, names: DecoderNames, rows: int, cache: CacheLayout,
                    logit_rows: int, image_tokens: int = 0, mode: str = "any") -> Node:
    """The graph for one step of generation: a prefill (rows = prompt length, one slot) or a
    batched decode (rows = sequences, one row per slot); both are the same computation.

    Inputs: token_ids, positions, slots (u32 [rows]), logit_rows (u32 [logit_rows]: which rows'
    logits to compute), block_table (u32 [cache.slots, cache.max_blocks]) and, with
    image_tokens > 0, image_features [image_tokens, hidden] with image_rows (u32 [image_tokens]:
    the rows of the <image> tokens they replace). Returns float32 logits [logit_rows, vocab].
    """
    token_ids = g.input_u32("token_ids", [rows])
    positions = g.input_u32("positions", [rows])
    slots = g.input_u32("slots", [rows])
    x = embed_tokens(g, cfg, names, token_ids)
    if image_tokens:
        features = g.input("image_features", [image_tokens, cfg.hidden_size])
        x = g.scatter_rows(x, g.input_u32("image_rows", [image_tokens]), features)
    hidden = decoder_cached(g, cfg, names, x, positions, slots, cache, mode)
    picked = g.embedding(g.input_u32("logit_rows", [logit_rows]), hidden)
    return lm_head(g, cfg, names, picked)
