"""The options of ``embedpipe serve`` (one frozen record the app, the CLI and ``pipeline.serve`` read), checked up front.

Safe defaults: loopback only, bounded request bodies (each, and all being read at once), bounded queries, bounded
connections and the time a client has to send a request, images checked against ``max_pixels`` before any pixel
is allocated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..model.image_header import DEFAULT_MAX_PIXELS
from ..threads import usable_cpus

TOKEN_ENV = "EMBEDPIPE_SERVE_TOKEN"  # where --token is read from when not given (keeps it out of `ps`)
WORKERS_ENV = "EMBEDPIPE_SERVE_WORKER"  # how --workers N hands the indexes and options to each worker process
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # index names appear in urls: /thumb/{name}/{key}
TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{8,}$")  # sent in a header and kept in a cookie: no separators


@dataclass(frozen=True)
class ServeOptions:
    """Options of ``embedpipe serve`` (checked by :meth:`validate` before any index is read)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_body_mb: float = 16.0  # whole request, multipart images included
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_k: int = 1000
    max_queries: int = 64  # keys, vectors or images in one request
    batch_wait_ms: float = 5.0  # how long the first image query waits for others to share its model call
    max_batch: int = 64  # images in one model call
    threads: int = 0  # FAISS / decode / shard-reading threads; 0: one per usable CPU (pipeline/threads.py)
    reload_every: float = 1.0  # seconds between checks for a swapped index directory (0: never reload)
    device: str = "auto"
    cache_mb: int = 1024  # decoded embedding files kept for key queries
    max_connections: int = 1000  # open connections; past it the one waiting longest for a request is closed
    max_concurrent: int = 256  # requests being answered at once (idle connections do not count); past it a 503
    header_timeout: float = 10.0  # seconds to send a request's headers (from the connection's opening or the
    # request's first byte), and the longest a body then waits for room in body_memory_mb
    body_timeout: float = 30.0  # seconds for a body to arrive once its reading starts
    keep_alive: float = 5.0  # seconds an idle connection stays open after an answer
    body_memory_mb: float = 64.0  # request bodies being read, parsed and answered at once, all requests together
    workers: int = 1  # processes sharing the port, each with its own copy of the indexes (and model)
    thumb_timeout: float = 10.0  # seconds for one thumbnail read from a remote (http, https...) shard
    thumb_threads: int = 4  # remote thumbnail reads at once, on their own pool (never the search pool)
    # Model files (TorchScript, weights) an index's embedding_meta may name for image queries: loading one runs
    # or reads a file the index names, so only those the operator lists (model/trust.py)
    trust_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_models", tuple(map(str, self.trust_models)))  # a list, from JSON or a caller

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} must be in 0..65535 (0: any free port)")
        if self.token is not None and not TOKEN.match(self.token):
            raise UserError("--token must be at least 8 characters of letters, digits and ._~+/=- (clients send it "
                            "as 'Authorization: Bearer TOKEN'); e.g. `python -c 'import secrets; "
                            "print(secrets.token_urlsafe())'`")
        for name, value in (("--max-body-mb", self.max_body_mb), ("--max-pixels", self.max_pixels),
                            ("--max-k", self.max_k), ("--max-queries", self.max_queries),
                            ("--max-batch", self.max_batch), ("--max-connections", self.max_connections),
                            ("--max-concurrent", self.max_concurrent), ("--header-timeout", self.header_timeout),
                            ("--body-timeout", self.body_timeout), ("--keep-alive", self.keep_alive),
                            ("--body-memory-mb", self.body_memory_mb), ("--workers", self.workers),
                            ("--thumb-timeout", self.thumb_timeout), ("--thumb-threads", self.thumb_threads)):
            if value <= 0:
                raise UserError(f"{name} {value} must be positive")
        if self.batch_wait_ms < 0 or self.reload_every < 0 or self.threads < 0 or self.cache_mb < 0:
            raise UserError("--batch-wait-ms, --reload-every, --threads and --cache-mb cannot be negative")
        usable_cpus()  # a bad EMBEDPIPE_THREADS is refused before any index is read
        if self.trust_models:
            from ..model.trust import TrustedFiles

            TrustedFiles.of(self.trust_models)  # each a file that exists

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def body_memory(self) -> int:
        return int(self.body_memory_mb * (1 << 20))

    @property
    def pool_size(self) -> int:
        return self.threads or usable_cpus()


def index_names(dirs: list[str | Path]) -> dict[str, Path]:
    """``DIR`` or ``NAME=DIR`` arguments -> {name: directory}; a name defaults to the directory's own name."""
    if not dirs:
        raise UserError("give at least one INDEX_DIR (built by `embedpipe index`)")
    out: dict[str, Path] = {}
    for arg in map(str, dirs):
        name, sep, path = arg.partition("=")
        if not sep or not NAME.match(name) or Path(arg).exists():
            name, path = Path(arg).resolve().name, arg
        if not NAME.match(name):
            raise UserError(f"index name {name!r} (of {arg}) is not usable in urls; pass NAME=DIR with a name of "
                            "letters, digits, '.', '_' or '-'")
        if name in out:
            raise UserError(f"two indexes are named {name!r} ({out[name]} and {path}); pass NAME=DIR to tell them apart")
        out[name] = Path(path)
    return out
