"""Helpers for the service tests: a real uvicorn server on a free loopback port (in a thread, or the real
``embedpipe serve`` in a process of its own), and a small HTTP client."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
import threading
import time
import uuid
from pathlib import Path
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


class Served:
    """A real ``embedpipe serve`` process: its base url, pid and everything it has written to stderr (its log)."""

    def __init__(self, proc: subprocess.Popen, base: str):
        self.proc, self.base, self.lines = proc, base, []
        self.address = (urlsplit(base).hostname, urlsplit(base).port)
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        self.reader.start()

    def log(self, since: int = 0) -> str:
        return "".join(self.lines[since:])

    def memory(self) -> tuple[float, float]:
        """(RSS, peak RSS) of the process in MiB, from /proc (VmRSS, VmHWM)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@contextlib.contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """``embedpipe serve ARGS --port 0`` in a process of its own; stopped (SIGTERM) on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *args, "--port", "0"],
                            env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
    try:
        line, head = "", []
        while "serving" not in line:
            line = proc.stderr.readline()
            head.append(line)
            assert line or proc.poll() is None, f"embedpipe serve exited before serving: {''.join(head)}"
        server = Served(proc, re.search(r"http://127\.0\.0\.1:\d+", line).group(0))
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def raise_open_files(need: int) -> None:
    """This process may open at least ``need`` files (sockets), within its hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))
