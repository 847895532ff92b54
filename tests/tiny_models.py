"""Tiny random transformers models (the reference) shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch

from meganeura.models import llama, smollm2
from meganeura.models.smolvlm2 import NAMES as VLM_NAMES
from meganeura.models.smolvlm2 import SmolVLM2Config
from meganeura.engine.runner import ModelSpec

IMAGE_TOKEN = 250


def tiny_llama(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


def tiny_smolvlm(seed: int = 0, context: int = 512):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=64, patch_size=8, hidden_size=32, num_attention_heads=4,
                           num_hidden_layers=2, intermediate_size=64, hidden_act="gelu_pytorch_tanh"),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=10000.0, max_position_embeddings=context, rms_norm_eps=1e-5),
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


SMOLVLM_SPECIALS = (["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"])


def write_tiny_smolvlm_folder(folder, seed: int = 0, context: int = 512):
    """A complete tiny SmolVLM checkpoint folder, as a user would download one: weights via
    save_pretrained, tokenizer.json (SmolLM2's vocabulary from the shipped GGUF plus SmolVLM's
    special tokens), the chat template and processor configs sized for a 64-pixel encoder.
    Returns the transformers model."""
    import json

    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from meganeura.weights import load_checkpoint

    tokenizer = load_checkpoint("smollm2-135m-instruct", progress=False).tokenizer
    tokenizer.add_special_tokens(SMOLVLM_SPECIALS)
    model = tiny_smolvlm(seed, context)
    model.config.image_token_id = tokenizer.token_to_id("<image>")
    model.config.text_config.vocab_size = 49280
    model.resize_token_embeddings(49280, mean_resizing=False)
    with torch.no_grad():  # perturb every row so none is trivially matched
        model.get_input_embeddings().weight.add_(torch.randn_like(model.get_input_embeddings().weight) * 0.02)
    end = tokenizer.token_to_id("<end_of_utterance>")
    model.config.eos_token_id = model.generation_config.eos_token_id = end
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_image_splitting": True, "size": {"longest_edge": 128}, "max_image_size": {"longest_edge": 64},
        "resample": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255}))
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": 16}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    return model
