"""uvicorn's connection handling, hardened against clients that hold connections open.

uvicorn (0.54) closes idle kept-alive connections (timeout_keep_alive) but has no deadline for
a request's headers, and its limit_concurrency answers 503 only once a request has arrived:
connections that send a partial header and stop ("slowloris") stay open for ever, each holding
a file descriptor, until the server can accept no more. The protocol below closes a
connection whose headers are not complete within header_timeout_s (counted from the
connection, or from the end of the previous response; the rest of a refused body must arrive
by then too), and closes new connections at once
beyond max_connections. It is uvicorn's h11 protocol (also where httptools is installed, which
uvicorn would pick otherwise): the deadline reads h11's connection state.
"""

from __future__ import annotations

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig


def uvicorn_config(app, config: ServerConfig, **settings) -> uvicorn.Config:
    class Guarded(_GuardedH11):
        header_timeout_s, max_connections = config.header_timeout_s, config.max_connections

    return uvicorn.Config(app, http=Guarded, timeout_keep_alive=config.keep_alive_s, **settings)


class _GuardedH11(H11Protocol):
    header_timeout_s: float
    max_connections: int
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()  # before reading a byte: cheaper for both sides than a 503
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()

    def _headers_late(self) -> None:
        # their_state leaves IDLE once a request's headers are complete; our_state stays DONE
        # only while the client still sends the body of a request already answered (a 413)
        if (self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE) and not self.transport.is_closing():
            self.transport.close()
