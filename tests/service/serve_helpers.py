"""Helpers for the service tests: a real uvicorn server on a free loopback port, and a small HTTP client."""
from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path
import threading
import time
import uuid
from typing import Any, Iterator
from urllib.parse import urlsplit

import uvicorn

from pipeline.service.run import listen, url_of


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a thread; yields its base url; stops it (and waits) on exit."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.body[:200])
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
         chunked: bool = False, timeout: float = 60) -> Reply:
    """One HTTP request on a fresh connection (no redirects followed)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def post_json(url: str, obj: Any, headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
    return call(url, "POST", json.dumps(obj).encode(), {"content-type": "application/json", **(headers or {})},
                timeout=timeout)


def multipart(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """(body, content-type) of a multipart form: ``(name, value)`` fields, ``(name, (filename, bytes))`` files."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            data = value[1]
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', value.encode()
        parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_form(url: str, fields: list[tuple[str, Any]], headers: dict[str, str] | None = None) -> Reply:
    body, ctype = multipart(fields)
    return call(url, "POST", body, {"content-type": ctype, **(headers or {})})


class Figures(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.body = [], {}

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.body = dict(attrs)
        if tag == "img":
            self.figures.append(dict(attrs))


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args],
                          check=True, timeout=120, capture_output=True, text=True)
