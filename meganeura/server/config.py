"""The server's settings (the `meganeura serve` flags), and the KV-cache sizing they imply."""

from __future__ import annotations

from dataclasses import dataclass

# Without --max-context the cache gets the model's whole context, shrunk to fit this many
# bytes: 8 slots of SmolVLM2-500M's 8k context would otherwise take 5 GiB of fp32.
KV_CACHE_BUDGET = 2 * 2**30


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = "meganeura"           # the name /v1/models lists and requests must use
    max_batch: int = 8                    # sequences decoded together (KV-cache slots)
    max_context: int | None = None        # tokens per slot (prompt + answer); None: see KV_CACHE_BUDGET
    max_queue: int = 64                   # requests waiting for a slot; one more gets 429
    api_key: str | None = None
    allow_remote_media: bool = False
    media_root: str | None = None
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4                   # per request
    max_image_pixels: int = 16_777_216    # per image, checked before decoding (4096 x 4096)
    max_media_bytes: int = 20 * 2**20     # one fetched URL or local file
    remote_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_images", "max_image_pixels", "max_media_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


def cache_context(text_config, dtype: str, slots: int, requested: int | None) -> int:
    """Tokens per slot: as requested (at most the model's context), else the model's context
    cut to KV_CACHE_BUDGET in steps of 256 tokens."""
    limit = text_config.max_position_embeddings
    if requested is not None:
        if requested > limit:
            raise ValueError(f"max_context {requested} exceeds the model's context of {limit}")
        return requested
    per_token = 2 * text_config.num_hidden_layers * text_config.kv_dim * (4 if dtype == "float32" else 2)
    fits = KV_CACHE_BUDGET // (per_token * slots) // 256 * 256
    return min(limit, max(256, fits))
