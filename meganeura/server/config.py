"""The server's settings (the `meganeura serve` flags), and the KV-cache sizing they imply."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = "meganeura"           # the name /v1/models lists and requests must use
    max_batch: int = 8                    # sequences decoded together (KV-cache slots)
    max_context: int | None = None        # tokens per request (prompt + answer); None: the model's context
    max_queue: int = 64                   # requests waiting for a slot; one more gets 429
    api_key: str | None = None
    allow_remote_media: bool = False
    media_root: str | None = None
    max_body_bytes: int = 32 * 2**20
    max_images: int = 4                   # per request
    max_image_pixels: int = 16_777_216    # per image, checked before decoding (4096 x 4096)
    max_media_bytes: int = 20 * 2**20     # one fetched URL or local file
    max_videos: int = 2                   # per request (0: no videos)
    max_video_frames: int = 64            # frames sampled from one video (a request's max_frames up to this)
    max_video_stream_frames: int = 108_000    # frames a video file may hold (an hour at 30 fps)
    video_timeout_s: float = 60.0         # reading one video: scanning it and decoding its sampled frames
    max_video_requests: int = 2           # requests reading videos at once (each holds its frames); one more: 429
    remote_timeout_s: float = 10.0        # all of one request's remote images, redirects included
    max_remote_fetches: int = 8           # requests fetching remote images at once; one more gets 429
    allow_private_media_hosts: bool = False   # fetch loopback, private, link-local... addresses too
    header_timeout_s: float = 10.0        # a connection must send a request's headers within this
    body_timeout_s: float = 60.0          # ... and its body within this (32 MB at 0.5 MB/s)
    keep_alive_s: float = 5.0             # idle time before a kept-alive connection is closed
    max_connections: int = 1024           # open connections; more are closed on arrival

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_images", "max_image_pixels", "max_media_bytes",
                     "max_remote_fetches", "max_connections", "max_video_frames", "max_video_stream_frames",
                     "max_video_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_videos < 0:
            raise ValueError(f"max_videos must be >= 0, got {self.max_videos}")
        for name in ("remote_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s", "video_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


def request_context(runner, requested: int | None) -> int:
    """Tokens per request (prompt + answer): as requested, else the model's context; never
    more than the KV cache holds for one sequence."""
    limit = min(runner.max_seq, runner.cache.capacity_tokens)
    if requested is not None and requested > limit:
        raise ValueError(f"max_context {requested} exceeds the {limit} tokens one sequence can have here (the "
                         f"model's context is {runner.max_seq}; the KV cache holds {runner.cache.capacity_tokens})")
    return requested or limit
