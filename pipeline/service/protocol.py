"""The HTTP/1.1 protocol of ``embedpipe serve``: uvicorn's, plus the two limits it lacks before a request exists.

uvicorn closes a connection only when it stays silent after an answer (``timeout_keep_alive``): a connection
that never sends a request, or sends its headers a byte at a time, stays open for ever, and its
``limit_concurrency`` counts such connections, so a few hundred silent sockets turn every other client away with
503s. Here:

- a request's headers must arrive within ``header_timeout`` seconds of the connection's opening (or, on a kept-
  alive connection, of the next request's first byte), else the connection is closed (with a 408 when part of
  a request came);
- past ``max_connections`` open connections, the one that has waited longest for a request is closed, so idle
  sockets can never use up the process's file descriptors or crowd out clients that send requests;
- the limit on requests being answered at once is the app's (``guard.LimitConcurrency``), counting requests,
  never idle connections.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import uvicorn

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # httptools missing (the serve extra installs it): uvicorn's pure-Python parser
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

log = logging.getLogger(__name__)
WARN_EVERY = 60.0  # seconds between two warnings about closed connections (an attack must not flood the log)


class ServerConfig(uvicorn.Config):
    """uvicorn's Config with the protocol below and its two limits (pickled as it is into each worker process)."""

    def __init__(self, app: Any, *, header_timeout: float, max_connections: int, **kwargs: Any):
        super().__init__(app, http=GuardedHttp, ws="none", **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections


class GuardedHttp(_Base):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a cap on open connections."""

    waiting_since: float | None = None  # monotonic time since when this connection waits for a request
    _deadline: Any = None  # the header timer (an asyncio TimerHandle)
    _partial = False  # part of a request arrived since the last answer
    _warned = {"closed": 0.0}  # class-wide: when the last warning was logged

    def _busy(self) -> bool:
        """A request of this connection is being answered (its headers have arrived)."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait()
        self._arm()
        self._cap_connections()

    def data_received(self, data: bytes) -> None:
        if self._busy():  # the body of a request (its own deadline is the app's) or a pipelined one
            return super().data_received(data)
        self._partial = True
        if self._deadline is None:  # the first byte of a request on a kept-alive connection
            self._arm()
        super().data_received(data)
        if self._busy():
            self._disarm()
            self.waiting_since, self._partial = None, False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._busy():
            # Kept alive: silence is uvicorn's keep-alive timeout; the next request's first byte arms the deadline.
            self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.waiting_since = None
        super().connection_lost(exc)

    def _wait(self) -> None:
        self.waiting_since, self._partial = time.monotonic(), False

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.config.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._busy() or self.transport.is_closing():
            return
        if self._partial:  # a client that sent part of a request hears why; a silent one is just closed
            body = json.dumps({"error": f"the request's headers did not arrive within {self.config.header_timeout:g} "
                                        "s (--header-timeout)"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def _cap_connections(self) -> None:
        """Past ``max_connections`` open connections, close the one that has waited longest for a request."""
        if len(self.connections) <= self.config.max_connections:
            return
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.config.max_connections:
            return
        waiting = [c for c in open_ if getattr(c, "waiting_since", None) is not None]
        oldest = min(waiting, key=lambda c: c.waiting_since, default=self)
        oldest.transport.close()
        now = time.monotonic()
        if now - self._warned["closed"] > WARN_EVERY:
            self._warned["closed"] = now
            log.warning("more than %d connections open (--max-connections): closing those that wait longest for a "
                        "request (this warning repeats at most once a minute)", self.config.max_connections)
