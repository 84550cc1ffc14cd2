"""Request bodies: each one's size limit, the memory of all those in flight, and how long one may take to arrive.

A JSON body is parsed whole before its query limits can be checked, and parsing multiplies it (each number of a
vector becomes a 24-byte Python float in an 8-byte list slot), so the bodies in flight are admitted before their
first byte is read: together they reserve at most ``budget`` bytes (each its Content-Length, a chunked one the
size limit), held until its answer is sent. A body that does not fit waits, unread, in the kernel's socket buffers (uvicorn reads
64 kB ahead), for at most ``wait`` seconds (``--header-timeout``: the time a request may take to reach its body),
then gets a 503; how many wait is bounded by the requests answered at once (``guard.LimitConcurrency``). An
admitted body must arrive within ``timeout`` seconds (``--body-timeout``), else a 408.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from starlette.exceptions import HTTPException

from .guard import ASGIApp, Scope, _header, send_json

# A refused body's rest is still read (and dropped) before the connection is reused, so that a client still
# sending hears the answer instead of a broken pipe; protocol.py gives that reading --header-timeout seconds.


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-body-mb); send fewer or "
                              "smaller images")


class BodyTimeout(HTTPException):
    def __init__(self, timeout: float):
        super().__init__(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)",
                         headers={"connection": "close"})  # a client this slow is not waited for again


class BodyBudget:
    """Bytes of request bodies in flight at once: :meth:`hold` waits (first come, first served) until ``n`` fit."""

    def __init__(self, total: int):
        self.total = self.free = total
        self.waiting: deque[tuple[int, asyncio.Future]] = deque()

    async def hold(self, n: int, timeout: float) -> int:
        """Reserve ``n`` bytes (at most the whole budget: a body larger than it runs alone); TimeoutError after
        ``timeout`` seconds without room. Returns what to :meth:`release`."""
        n = min(n, self.total)
        if not self.waiting and n <= self.free:
            self.free -= n
            return n
        entry = (n, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        try:
            await asyncio.wait_for(entry[1], timeout)
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():  # room was given just as the wait ended
                self.release(n)
            else:
                self.waiting.remove(entry)
                self._wake()  # those behind it may fit now
            raise
        return n

    def release(self, n: int) -> None:
        self.free += n
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self.waiting[0][0] <= self.free:
            n, fut = self.waiting.popleft()
            if not fut.done():
                self.free -= n
                fut.set_result(None)


class LimitBody:
    """413 for a body above ``limit`` bytes (refused on its Content-Length, or counted as it streams in); a body
    is read only once :class:`BodyBudget` has room for it (503 after ``wait`` s) and must arrive within
    ``timeout`` s of that (408)."""

    def __init__(self, app: ASGIApp, limit: int, budget: int, wait: float, timeout: float):
        self.app, self.limit, self.wait, self.timeout = app, limit, wait, timeout
        self.budget = BodyBudget(budget)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_json(send, 413 if length.isdigit() else 400,
                                   {"error": BodyTooLarge(self.limit).detail if length.isdigit()
                                    else "invalid Content-Length header"})
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        size = int(length) if length is not None else self.limit if chunked else 0
        if size == 0:
            return await self.app(scope, receive, send)
        try:
            held = await self.budget.hold(size, self.wait)
        except asyncio.TimeoutError:
            mb = self.budget.total / (1 << 20)
            return await send_json(send, 503, {"error": f"busy: the request bodies being answered fill the {mb:g} MB "
                                                        "for bodies (--body-memory-mb); retry in a moment"},
                                   [(b"retry-after", b"1")])
        try:
            await self.app(scope, self._timed(receive), send)
        finally:
            self.budget.release(held)

    def _timed(self, receive: Any) -> Any:
        """``receive`` that counts the body (413 past the limit) and gives it ``timeout`` seconds to arrive (408)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        seen, done = 0, False

        async def counted() -> Any:
            nonlocal seen, done
            if done:  # after the body: waits for a disconnect, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body without a length: stop reading it here
                    raise BodyTooLarge(self.limit)
                done = not message.get("more_body", False)
            return message

        return counted
