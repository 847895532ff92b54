"""SmolLM2: text-only Llama checkpoints (LlamaForCausalLM), sharing llama.py's builders."""

from __future__ import annotations

from pathlib import Path

from ..engine.kv_cache import CacheLayout
from ..graph import Graph, Node
from .llama import DecoderNames, TextConfig, build_text_step, decoder_full, embed_tokens, lm_head, read_config

NAMES = DecoderNames(model="model.")


def smollm2_135m() -> TextConfig:
    return TextConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def smollm2_360m() -> TextConfig:
    return TextConfig(vocab_size=49152, hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                      num_key_value_heads=5, intermediate_size=2560, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def smollm2_1_7b() -> TextConfig:
    return TextConfig(vocab_size=49152, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=130000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)


def from_hf(config: dict | str | Path) -> TextConfig:
    """From a llama config.json (dict, file or folder); unknown keys ignored."""
    config = read_config(config)
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"not a Llama config: model_type {config.get('model_type')!r}")
    return TextConfig.from_dict(config)


def build_graph(g: Graph, config: TextConfig, seq_len: int) -> Node:
    """Full causal forward over `token_ids` u32 [seq_len] -> logits [seq_len, vocab] (no cache)."""
    x = embed_tokens(g, config, NAMES, g.input_u32("token_ids", [seq_len]))
    return lm_head(g, config, NAMES, decoder_full(g, config, NAMES, x, None))


def build_text_graph(g: Graph, config: TextConfig, rows: int, cache: CacheLayout, logit_rows: int) -> Node:
    """Prefill or decode step over a KV cache of this layout (see `llama.build_text_step`)."""
    return build_text_step(g, config, NAMES, rows, cache, logit_rows)
