"""Configs are checked before anything is built from them: values by type and range, then sizes
against the checkpoint's tensors (a config claiming a million layers once built a graph until
the OOM killer came)."""

import math
import re
import time

import numpy as np
import pytest

from meganeura.engine.kv_cache import CacheLayout
from meganeura.graph import Graph
from meganeura.models.llama import TextConfig, build_text_step
from meganeura.models.siglip import VisionConfig
from meganeura.models.smolvlm2 import SmolVLM2Config
from meganeura.models import smollm2
from meganeura.pipeline import compile_options, model_spec

TEXT = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256}
VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 64}
VLM = {"model_type": "smolvlm", "text_config": TEXT, "vision_config": VISION, "scale_factor": 2,
       "image_token_id": 250}


def _tensors(config: dict) -> dict:
    """A checkpoint's tensors for a valid llama config, as zero-cost read-only views."""
    g = Graph()
    text = smollm2.from_hf(config)
    build_text_step(g, text, smollm2.NAMES, 1, CacheLayout(1, text.kv_dim, num_blocks=2, slots=2, max_blocks=1), 1)
    return {name: np.broadcast_to(np.float32(0), t.shape) for name, t in g.parameters.items()}


@pytest.mark.parametrize("key, value, message", [
    ("num_attention_heads", 0, "num_attention_heads must be an integer from 1"),
    ("hidden_size", "64", "hidden_size must be an integer from 1 to 16777216, got '64'"),
    ("hidden_size", None, "hidden_size is missing (or null)"),
    ("hidden_size", True, "hidden_size must be an integer"),
    ("num_hidden_layers", 10**12, "num_hidden_layers must be an integer from 1 to 16777216"),
    ("rms_norm_eps", -1, "rms_norm_eps must be a finite number > 0, got -1"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a finite number > 0"),
    ("rope_theta", math.nan, "rope_theta must be a finite number > 0, got nan"),
    ("rope_theta", 0, "rope_theta must be a finite number > 0"),
    ("num_attention_heads", 5, "hidden_size 64 must be num_attention_heads 5 times an even head size"),
    ("num_key_value_heads", 3, "num_attention_heads 4 must be a multiple of num_key_value_heads 3"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
])
def test_text_config_values_are_checked(key, value, message):
    with pytest.raises(ValueError, match="^config.json: " + re.escape(message)):
        model_spec({**TEXT, key: value})


def test_rope_theta_inside_rope_parameters_is_checked_too():
    config = {k: v for k, v in TEXT.items() if k != "rope_theta"}
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 0, got -1"):
        TextConfig.from_dict({**config, "rope_parameters": {"rope_theta": -1}})


@pytest.mark.parametrize("section, key, value, message", [
    ("vision_config", "patch_size", 0, "vision_config.patch_size must be an integer from 1"),
    ("vision_config", "image_size", 60, "vision_config.image_size 60 must be a multiple of patch_size 8"),
    ("vision_config", "layer_norm_eps", math.inf, "vision_config.layer_norm_eps must be a finite number > 0"),
    (None, "scale_factor", 0, "scale_factor must be an integer from 1"),
    (None, "scale_factor", 3, "scale_factor 3 must divide the 8 patches per side"),
    (None, "image_token_id", 300, "image_token_id 300 is not below text_config.vocab_size 300"),
    (None, "vision_config", [], "vision_config must be a JSON object, got list"),
])
def test_vlm_config_values_are_checked(section, key, value, message):
    config = {**VLM, "vision_config": dict(VISION)}
    (config[section] if section else config)[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        SmolVLM2Config.from_hf(config)
    with pytest.raises(ValueError, match="^my/config.json: "):
        model_spec(config, where="my/config.json")


def test_valid_configs_still_read():
    assert VisionConfig.from_dict(VISION).num_patches == 64
    assert SmolVLM2Config.from_hf(VLM).num_vision_tokens == 16
    assert model_spec(TEXT, _tensors(TEXT)).text.head_dim == 16


def test_layer_count_is_checked_against_the_tensors_before_any_graph():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="^ckpt/config.json says num_hidden_layers 1000000 but the checkpoint has "
                                         "tensors for 2 layers$"):
        model_spec({**TEXT, "num_hidden_layers": 1_000_000}, _tensors(TEXT), "ckpt/config.json")
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("key, value, tensor", [
    ("vocab_size", 301, "model.embed_tokens.weight is [300, 64] there"),
    ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight is [96, 64] there"),
    ("num_key_value_heads", 4, "model.layers.0.self_attn.k_proj.weight is [32, 64] there"),
])
def test_sizes_are_checked_against_the_tensors(key, value, tensor):
    with pytest.raises(ValueError, match=re.escape(f"config.json does not match the checkpoint: {tensor}") +
                       f".*{key} {value}"):
        model_spec({**TEXT, key: value}, _tensors(TEXT))


def test_device_and_dtype_are_checked():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        compile_options("gpu")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        compile_options("cpu", "fp8")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device cuda:0: no CUDA GPU is available \(torch.cuda.is_available"):
            compile_options("cuda:0")
