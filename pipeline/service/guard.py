"""What stands before every route: the limit on requests answered at once, and the bearer token (when one is set).

Both are plain ASGI middleware (as is ``bodies.LimitBody``, the body limits, behind them), so they hold for every
route, the 404s included, and for the app mounted inside another one. Browsers cannot put a header on an
``<img>`` request, so the page trades the token once (``/?token=...``) for an HttpOnly, SameSite=Strict cookie;
API clients send ``Authorization: Bearer TOKEN``.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode

from starlette.requests import cookie_parser

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
COOKIE = "embedpipe_token"


async def send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class RequireToken:
    """401 for any request without the token (``Authorization: Bearer``, or the page's cookie)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token.encode()

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)  # constant time

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        auth = _header(scope, b"authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and self._ok(value.strip()):
            return await self.app(scope, receive, send)
        # Parsed as browsers do: never an error (http.cookies raised CookieError on a name such as 'a<b': a 500,
        # with a traceback logged, for any unauthenticated client).
        if self._ok(cookie_parser(_header(scope, b"cookie") or "").get(COOKIE)):
            return await self.app(scope, receive, send)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        token = next((v for k, v in query if k == "token"), None)
        root = scope.get("root_path", "")
        path = scope["path"].removeprefix(root)  # when mounted, the path within the app
        if path == "/" and scope["method"] == "GET" and self._ok(token):
            # The page's login: the token becomes a cookie and leaves the address bar (and the history).
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            here = root + "/" + (f"?{rest}" if rest else "")
            await send({"type": "http.response.start", "status": 303, "headers": [
                (b"location", here.encode()), (b"content-length", b"0"),
                (b"set-cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path={root or '/'}".encode())]})
            return await send({"type": "http.response.body", "body": b""})
        await send_json(send, 401, {"error": "this service needs its token: send 'Authorization: Bearer TOKEN' "
                                             "(or open the page as /?token=TOKEN)"},
                        [(b"www-authenticate", b'Bearer realm="embedpipe"')])


class LimitConcurrency:
    """503 (with Retry-After) for a request beyond ``limit`` being answered at once: a burst is refused in a
    microsecond instead of queueing without bound. Idle connections are not requests (``protocol.py``)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await send_json(send, 503, {"error": f"busy: {self.limit} requests are being answered "
                                                        "(--max-concurrent); retry in a moment"},
                                   [(b"retry-after", b"1")])
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
