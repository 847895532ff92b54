"""Giving the memory of big requests back to the system.

glibc keeps the heap pages that a big request's strings and arrays (a 20 MB prompt parsed, a
decoded image) leave behind, per worker thread, for later use; rounds of such requests ratchet
the resident size up. Measured with the tiny SmolVLM, 8 hostile requests a round, RSS after
each of 6 rounds: 890 -> 970 -> 1180 -> 1143 -> 1144 -> 1189 MB without a trim; 856 -> 763
-> 760 -> 802 -> 835 -> 820 MB with malloc_trim after each big request. (A fixed
M_MMAP_THRESHOLD kept it flat too, but slowed SmolLM2 decoding from 25 to 18 tokens/s: every
large tensor became a fresh mmap. The CPU backend fixes it at 4 MiB, which decoding does not
feel: backends/torch_backend.py.)
"""

from __future__ import annotations

import asyncio
import ctypes

BIG_BODY = 2**20  # bytes; smaller requests leave too little behind to be worth a trim

M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)
ARENAS = 2

try:
    _libc = ctypes.CDLL(None)
    _malloc_trim, _mallopt = _libc.malloc_trim, _libc.mallopt  # glibc only
except (AttributeError, OSError, TypeError):
    _malloc_trim = _mallopt = None


def limit_arenas() -> None:
    """At most ARENAS malloc arenas from now on. glibc gives threads that contend their own
    arena (up to 8 per core), and the worker threads that parse bodies and decode images each
    leave freed memory in theirs: the tiny SmolVLM server under rounds of hostile requests
    settled ~30% higher and drifted (444 -> 494 MB over 7 rounds; +15% by round 3 in one CI
    run) where two arenas kept it flat (372-388 MB). Call it before the threads start."""
    if _mallopt is not None:
        _mallopt(M_ARENA_MAX, ARENAS)


class TrimAfterBigBodies:
    """ASGI middleware: once a request with a body of BIG_BODY bytes or more is answered, returns
    free heap memory to the system (in a worker thread: a trim walks the whole heap)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _malloc_trim is None:
            return await self.app(scope, receive, send)
        size = 0

        async def counted():
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            return message
        await self.app(scope, counted, send)
        if size >= BIG_BODY:
            await asyncio.to_thread(_malloc_trim, 0)
