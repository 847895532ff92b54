"""Tiny random transformers models (the reference) shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch

from meganeura.models import llama, smollm2
from meganeura.models.smolvlm2 import NAMES as VLM_NAMES
from meganeura.models.smolvlm2 import SmolVLM2Config
from meganeura.runtime import ModelSpec

IMAGE_TOKEN = 250


def tiny_llama(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def tiny_smolvlm(seed: int = 0):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=64, patch_size=8, hidden_size=32, num_attention_heads=4,
                           num_hidden_layers=2, intermediate_size=64, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5),
        scale_factor=2, image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    # Random init leaves some norms at exactly 1/0; perturb every tensor so nothing is trivially matched.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def llama_spec(model) -> ModelSpec:
    return ModelSpec(text=smollm2.from_hf(model.config.to_dict()), names=smollm2.NAMES)


def smolvlm_spec(model) -> ModelSpec:
    cfg = SmolVLM2Config.from_hf(model.config.to_dict())
    return ModelSpec(text=cfg.text, names=VLM_NAMES, vlm=cfg)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN in result"
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


__all__ = ["tiny_llama", "tiny_smolvlm", "state_dict", "llama_spec", "smolvlm_spec", "rel_err", "IMAGE_TOKEN",
           "llama"]
