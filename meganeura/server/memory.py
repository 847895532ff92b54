"""Giving the memory of big requests back to the system.

glibc keeps the heap pages that a big request's strings and arrays (a 20 MB prompt parsed, a
decoded image) leave behind, per worker thread, for later use; rounds of such requests ratchet
the resident size up. Measured with the tiny SmolVLM, 8 hostile requests a round, RSS after
each of 6 rounds: 890 -> 970 -> 1180 -> 1143 -> 1144 -> 1189 MB without a trim; 856 -> 763
-> 760 -> 802 -> 835 -> 820 MB with malloc_trim after each big request. (A fixed
M_MMAP_THRESHOLD kept it flat too, but slowed SmolLM2 decoding from 25 to 18 tokens/s: every
large tensor became a fresh mmap.)
"""

from __future__ import annotations

import asyncio
import ctypes

BIG_BODY = 2**20  # bytes; smaller requests leave too little behind to be worth a trim

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
except (AttributeError, OSError, TypeError):
    _malloc_trim = None


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
