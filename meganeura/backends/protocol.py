"""What a backend offers: the runner, the sessions, the KV cache and the scheduler use these
and nothing else (numpy_backend.py is the reference, torch_backend.py the fast one)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from ..graph import Node


class Backend(Protocol):
    name: str
    can_capture: bool  # records a run once and replays it (CUDA graphs); sessions then refill fixed buffers

    # ---- arrays ------------------------------------------------------------------------
    def from_host(self, array, dtype: str) -> Any:
        """A backend array of a host array ("f32": the backend's float dtype; "u32": indices)."""

    def weight(self, source, form: str) -> Any:
        """A product weight kept compact ("int8", "int4"): `source` is a float [N, K] host array
        or a GGUF tensor's quantized blocks (weights.LazyTensors.blocks). Optional: only
        backends that offer compact forms are asked (the torch backend on the CPU)."""

    def to_host(self, value) -> np.ndarray:
        """float32 (or uint32 for indices) numpy array."""

    def write(self, dst, array, dtype: str) -> None:
        """Copy into an existing backend array, in place (recordings read it there)."""

    def owns(self, value) -> bool:
        """Is value already one of this backend's arrays (tokens chosen on the device)?"""

    def concat(self, parts: list) -> Any: ...

    def copy(self, value) -> Any: ...

    def zeros(self, shape) -> Any: ...

    # ---- running -----------------------------------------------------------------------
    def run(self, node: Node, args: list) -> Any:
        """One dispatch: node's op on its operands' values."""

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Record fn's work once; returns the replay (only where can_capture)."""

    # ---- the KV cache's memory (engine/kv_cache.py) --------------------------------------
    def cache_storage(self, shape) -> Any:
        """The cache's one allocation, zeros; on the host, lazily backed by RAM."""

    def forget_pages(self, storage, pages: list[int]) -> None:
        """Pages returned by their sequence: host memory may go back to the OS."""

    def free_memory(self) -> int | None:
        """Free device memory in bytes (sizes the cache's default budget); None on the host."""

    # ---- choosing tokens -----------------------------------------------------------------
    def sampler(self) -> Any:
        """The default sampler (engine/sampler.py) for this backend's logits."""
