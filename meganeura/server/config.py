"""The server's settings (the `meganeura serve` flags), and the KV-cache sizing they imply."""

from __future__ import annotations

from dataclasses import dataclass

# The KV cache (max-batch x max-context tokens, reserved at start) must fit this many bytes
# unless the server is told otherwise: without --max-context the context shrinks to fit (8 slots
# of SmolVLM2-500M's 8k context would take 5 GiB of fp32); settings that cannot fit are refused.
KV_CACHE_BUDGET = 2 * 2**30
CONTEXT_STEP = 256  # the runtime reserves the cache in steps of this many tokens


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
    remote_timeout_s: float = 10.0        # all of one request's remote images, redirects included
    max_remote_fetches: int = 8           # requests fetching remote images at once; one more gets 429
    allow_private_media_hosts: bool = False   # fetch loopback, private, link-local... addresses too
    kv_cache_bytes: int = KV_CACHE_BUDGET
    header_timeout_s: float = 10.0        # a connection must send a request's headers within this
    body_timeout_s: float = 60.0          # ... and its body within this (32 MB at 0.5 MB/s)
    keep_alive_s: float = 5.0             # idle time before a kept-alive connection is closed
    max_connections: int = 1024           # open connections; more are closed on arrival

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_images", "max_image_pixels", "max_media_bytes",
                     "max_remote_fetches", "kv_cache_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("remote_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


def cache_context(text_config, dtype: str, slots: int, requested: int | None, budget: int = KV_CACHE_BUDGET) -> int:
    """Tokens per slot: as requested (at most the model's context), else the model's context
    cut to the budget in steps of 256 tokens. Raises ValueError when the cache cannot fit."""
    limit = text_config.max_position_embeddings
    if requested is not None and requested > limit:
        raise ValueError(f"max_context {requested} exceeds the model's context of {limit}")
    per_token = 2 * text_config.num_hidden_layers * text_config.kv_dim * (4 if dtype == "float32" else 2)
    fits = budget // (per_token * slots) // CONTEXT_STEP * CONTEXT_STEP
    context = requested or min(limit, max(fits, CONTEXT_STEP))
    reserved = -(-context // CONTEXT_STEP) * CONTEXT_STEP  # what the runtime will allocate
    if reserved > fits:
        raise ValueError(f"--max-batch {slots} x {reserved} tokens needs {_gib(per_token * slots * reserved)} of "
                         f"KV cache ({dtype}); the budget is {_gib(budget)}: lower --max-batch or --max-context, "
                         "or raise the budget (ServerConfig.kv_cache_bytes)")
    return context


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
