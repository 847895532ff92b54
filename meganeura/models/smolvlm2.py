"""SmolVLM2: SigLIP encoder -> pixel shuffle -> linear connector -> Llama decoder.

`build_graph` and `build_vision_encoder` are the seed API; `build_vision_graph` and
`build_text_step` (from llama.py) are the graphs the model runner uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.kv_cache import CacheLayout
from ..graph import Graph, Node
from . import siglip
from .fields import json_object, read_fields
from .llama import DecoderNames, TextConfig, build_text_step, decoder_full, embed_tokens, lm_head, read_config
from .siglip import VisionConfig, patch_mask, position_ids

NAMES = DecoderNames(model="model.text_model.")
CONNECTOR = "model.connector.modality_projection.proj.weight"


# The vision tower the 256M and 500M checkpoints share (SigLIP base, 512 px, 16 px patches).
SIGLIP_512 = VisionConfig(image_size=512, patch_size=16, hidden_size=768, num_attention_heads=12,
                          num_hidden_layers=12, intermediate_size=3072, layer_norm_eps=1e-6)


@dataclass(frozen=True)
class SmolVLM2Config:
    vision: VisionConfig
    text: TextConfig
    scale_factor: int = 4
    image_token_id: int = 49190

    # ---- derived sizes ----
    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def patch_dim(self) -> int:
        return self.vision.patch_dim

    @property
    def head_dim(self) -> int:
        return self.text.head_dim

    @property
    def kv_dim(self) -> int:
        return self.text.kv_dim

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image (tile) after the pixel shuffle: 1024 / 4^2 = 64 for the 500M model."""
        return self.vision.num_patches // self.scale_factor ** 2

    @property
    def connector_input_dim(self) -> int:
        return self.vision.hidden_size * self.scale_factor ** 2

    # ---- presets (the published checkpoints' config.json values) ----
    @classmethod
    def smolvlm2_500m(cls) -> "SmolVLM2Config":
        """HuggingFaceTB/SmolVLM2-500M-Video-Instruct"""
        return cls(
            vision=SIGLIP_512,
            text=TextConfig(vocab_size=49280, hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                            num_key_value_heads=5, intermediate_size=2560, rms_norm_eps=1e-5,
                            rope_theta=100000.0, max_position_embeddings=8192),
            scale_factor=4)

    @classmethod
    def smolvlm2_256m(cls) -> "SmolVLM2Config":
        """HuggingFaceTB/SmolVLM2-256M-Video-Instruct"""
        return cls(
            vision=SIGLIP_512,
            text=TextConfig(vocab_size=49280, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, intermediate_size=1536, rms_norm_eps=1e-5,
                            rope_theta=100000.0, max_position_embeddings=8192),
            scale_factor=4)

    @classmethod
    def smolvlm2_2_2b(cls) -> "SmolVLM2Config":
        """HuggingFaceTB/SmolVLM2-2.2B-Instruct"""
        return cls(
            vision=VisionConfig(image_size=384, patch_size=14, hidden_size=1152, num_attention_heads=16,
                                num_hidden_layers=27, intermediate_size=4304, layer_norm_eps=1e-6),
            text=TextConfig(vocab_size=49280, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                            num_key_value_heads=32, intermediate_size=8192, rms_norm_eps=1e-5,
                            rope_theta=273768.0, max_position_embeddings=16384),
            scale_factor=3)

    @classmethod
    def from_hf(cls, config: dict | str | Path) -> "SmolVLM2Config":
        """From a checkpoint's config.json (a dict, the file, or its folder); unknown keys ignored."""
        config = read_config(config)
        if "vision_config" not in config or "text_config" not in config:
            raise ValueError(f"not a SmolVLM config: no vision_config/text_config (model_type "
                             f"{config.get('model_type')!r})")
        text = dict(json_object(config["text_config"], "text_config"))
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
        vision = VisionConfig.from_dict(config["vision_config"], "vision_config.")
        cfg = cls(vision=vision, text=TextConfig.from_dict(text, "text_config."),
                  **read_fields(cls, {"scale_factor": 2, "image_token_id": 49190, **config}))
        if vision.patches_per_side % cfg.scale_factor:  # the pixel shuffle folds scale x scale patches
            raise ValueError(f"scale_factor {cfg.scale_factor} must divide the {vision.patches_per_side} patches "
                             f"per side of vision_config (image_size / patch_size)")
        if cfg.image_token_id >= cfg.text.vocab_size:
            raise ValueError(f"image_token_id {cfg.image_token_id} is not below text_config.vocab_size "
                             f"{cfg.text.vocab_size}")
        return cfg


# ---- graphs ---------------------------------------------------------------------------------

def build_vision_encoder(g: Graph, vision_config: VisionConfig, num_patches: int) -> Node:
    """The encoder alone for one image: input `image_patches` [num_patches, patch_dim] ->
    [num_patches, vision_hidden]."""
    patches = g.input("image_patches", [num_patches, vision_config.patch_dim])
    return siglip.vision_encoder(g, vision_config, patches, images=1)


def connector(g: Graph, config: SmolVLM2Config, shuffled: Node) -> Node:
    """[tokens, vision_hidden * scale^2] -> [tokens, text_hidden]"""
    w = g.parameter(CONNECTOR, [config.text.hidden_size, config.connector_input_dim])
    return g.linear(shuffled, w)


def build_graph(g: Graph, config: SmolVLM2Config, text_seq_len: int) -> Node:
    """The seed graph. Declares `image_patches`, `vision_features_shuffled`, `combined_embeds`
    and `token_ids`, and returns logits [num_vision_tokens + text_seq_len, vocab] of a causal
    forward over `combined_embeds` (the image tokens first, then the text).

    The vision encoder and the connector are built on their inputs too, so every input is
    declared; the runner's graphs (`build_vision_graph`, `build_text_step`) chain them."""
    build_vision_encoder(g, config.vision, config.num_patches)
    connector(g, config, g.input("vision_features_shuffled", [config.num_vision_tokens,
                                                              config.connector_input_dim]))
    embed_tokens(g, config.text, NAMES, g.input_u32("token_ids", [text_seq_len]))
    rows = config.num_vision_tokens + text_seq_len
    embeds = g.input("combined_embeds", [rows, config.text.hidden_size])
    return lm_head(g, config.text, NAMES, decoder_full(g, config.text, NAMES, embeds, None))


def build_vision_graph(g: Graph, config: SmolVLM2Config, images: int, size: tuple[int, int] | None = None,
                       padded: bool = False) -> Node:
    """Images (tiles or frames) -> image features [images * tokens, text_hidden], all in the graph:
    patchify, encoder, pixel shuffle, connector.

    Inputs: `pixel_values` [images, 3, H, W] (size = (H, W), default the encoder's image size);
    with padded=True also `patch_positions` u32 [images * patches] and `patch_mask`
    [images, patches] (see `vision_inputs`)."""
    v = config.vision
    h, w = size or (v.image_size, v.image_size)
    pixels = g.input("pixel_values", [images, v.num_channels, h, w])
    patches = g.patchify(pixels, v.patch_size)
    n = patches.shape[0] // images
    positions = mask = None
    if padded:
        positions = g.input_u32("patch_positions", [images * n])
        mask = g.input("patch_mask", [images, n])
    hidden = siglip.vision_encoder(g, config.vision, patches, images, positions, mask)
    return connector(g, config, g.pixel_shuffle(hidden, images, config.scale_factor))


def vision_inputs(config: SmolVLM2Config, pixel_values, pixel_attention_mask=None) -> dict:
    """Inputs for `build_vision_graph` from processor outputs [images, 3, H, W] (+ mask, on the host)."""
    p = config.vision.patch_size
    inputs = {"pixel_values": pixel_values}
    if pixel_attention_mask is not None:
        mask = patch_mask(pixel_attention_mask.astype(bool), p)
        inputs["patch_positions"] = position_ids(mask, config.vision.patches_per_side).reshape(-1).astype("uint32")
        inputs["patch_mask"] = mask.reshape(mask.shape[0], -1).astype("float32")
    return inputs


def build_text_graph(g: Graph, config: SmolVLM2Config, rows: int, cache: CacheLayout, logit_rows: int,
                     image_tokens: int = 0) -> Node:
    """Prefill or decode step of the text model over a KV cache of this layout (see
    `llama.build_text_step`)."""
    return build_text_step(g, config.text, NAMES, rows, cache, logit_rows, image_tokens)


__all__ = ["SmolVLM2Config", "VisionConfig", "TextConfig", "build_graph", "build_vision_encoder",
           "build_vision_graph", "build_text_graph", "vision_inputs", "connector"]
