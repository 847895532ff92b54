"""SmolVLM2-500M's architecture as transformers' SmolVLMConfig arguments, for the benches that
build it with random weights (one definition: bench_gpu.py, bench_prefix_cache.py, bench_caption.py)."""

VISION = dict(image_size=512, patch_size=16, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
              intermediate_size=3072, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TEXT_500M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5)


def text_config(**shape) -> dict:
    """The text decoder's config: SmolVLM2's vocabulary, RoPE and context, `shape` (default 500M)."""
    return dict(model_type="llama", vocab_size=49280, rope_theta=100000.0, max_position_embeddings=8192,
                rms_norm_eps=1e-5, **(shape or TEXT_500M))
