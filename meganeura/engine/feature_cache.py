"""Vision features kept under the content hash of the pixels they came from, so an image seen
again skips the encoder even when the text around it changed. Bounded by bytes; the least
recently used features go first. The same bounded cache keeps a conversation's preprocessed
images (`Prepared`) under the hash of their decoded pixels, so a chat that sends the same
photo every turn resizes, splits and hashes it once.

Keys hash the preprocessed pixels of one tile (or video frame) with its padding mask and
shape: equal keys mean equal encoder inputs, whatever the file was called or where it came
from. The same keys mark a prompt's image positions in the prefix cache (kv_cache.block_hashes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_BYTES = 128 * 2**20   # ~40 13-tile SmolVLM2-500M images in float32
PREPARED_BYTES = 256 * 2**20  # ~6 13-tile images' float32 pixels


def image_key(images) -> bytes:
    """One key for a list of decoded (PIL) images: their modes, sizes and pixels."""
    h = hashlib.blake2b(digest_size=16)
    for image in images:
        h.update(repr((image.mode, image.size)).encode())
        h.update(image.tobytes())
    return h.digest()


def tile_keys(pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None) -> list[bytes]:
    """One key per tile of pixel_values [tiles, 3, H, W] (float32) and its mask [tiles, H, W]."""
    keys = []
    for k, tile in enumerate(pixel_values):
        h = hashlib.blake2b(repr((tile.shape, str(tile.dtype))).encode(), digest_size=16)
        h.update(np.ascontiguousarray(tile).tobytes())
        if pixel_attention_mask is not None:
            h.update(np.ascontiguousarray(pixel_attention_mask[k], dtype=bool).tobytes())
        keys.append(h.digest())
    return keys


@dataclass(frozen=True)
class Prepared:
    """preprocess_images' result for one conversation's images, read-only, and its tile keys."""

    batch: dict
    keys: list[bytes]

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.batch.values() if isinstance(v, np.ndarray))


class FeatureCache:
    """key -> value (a backend array of one tile's features, or a `Prepared`), at most
    `max_bytes` of them in all (by their `nbytes`)."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes):
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value) -> None:
        """Keep `value` (its own copy: a view would keep the whole batch it came from alive)."""
        if key in self._items or value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
