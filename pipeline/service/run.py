"""Run the service on uvicorn: bind the socket first (so port 0 gives a free port and errors come before loading),
then serve until interrupted."""
from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from ..index.layout import read_record
from .options import WORKERS_ENV, ServeOptions, index_names

log = logging.getLogger(__name__)
FILES_BESIDES_CONNECTIONS = 128  # open files the service needs for itself: indexes, shards, libraries, the socket


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), with a clear error when it is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} cannot be resolved: {e}") from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one)") from None


def fit_open_files(opts: ServeOptions) -> ServeOptions:
    """``opts`` with ``max_connections`` below the open-file limit, which is raised to its hard limit if need be:
    past it, accepting a connection fails and the server stops accepting for a while."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows): its own limits apply
        return opts
    need = opts.max_connections + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        fit = max(1, soft - FILES_BESIDES_CONNECTIONS)
        log.warning("--max-connections %d is more than this process may open (ulimit -n %d, less %d for the "
                    "indexes and shards): using %d; raise the hard limit to allow more", opts.max_connections, soft,
                    FILES_BESIDES_CONNECTIONS, fit)
        opts = replace(opts, max_connections=fit)
    return opts


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(indexes: Sequence[str | Path], ready: Callable[[str], None] | None = None, **options: Any) -> None:
    """Serve ``indexes`` over HTTP until interrupted (Ctrl-C, SIGTERM); ``ready(url)`` once it listens.

    ``options`` are :class:`ServeOptions` fields (``host``, ``port``, ``token``, ``max_body_mb``, ``workers``, ...).
    Runs on uvicorn with ``protocol.py``'s HTTP protocol (header deadline, cap on open connections).
    With ``workers`` > 1, that many processes share the socket, each loading the indexes itself.
    """
    try:
        import python_multipart  # noqa: F401  (Starlette's form parser)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"serving needs the serve extra ({e.name} is missing): pip install 'embedpipe[serve]'") from None

    from .protocol import ServerConfig

    opts = ServeOptions(**options)
    opts.validate()
    dirs = index_names(list(indexes))
    opts = fit_open_files(opts)
    sock = listen(opts.host, opts.port)
    try:
        common = dict(log_level=logging.getLogger().getEffectiveLevel(), lifespan="on", server_header=False,
                      # The access log would show the /?token=... of the page's login: on only with everyone's
                      # INFO lines (-vv).
                      access_log=logging.getLogger().isEnabledFor(logging.INFO),
                      # Requests answered at once are limited by the app (guard.LimitConcurrency): uvicorn's own
                      # limit counted idle connections too, so silent sockets made it refuse everyone.
                      limit_concurrency=None, timeout_keep_alive=opts.keep_alive, timeout_graceful_shutdown=30,
                      header_timeout=opts.header_timeout, max_connections=opts.max_connections)
        if opts.workers > 1:
            from uvicorn.supervisors import Multiprocess

            for path in dirs.values():
                read_record(path)  # a bad directory stops the service here, before any worker starts
            os.environ[WORKERS_ENV] = json.dumps({"indexes": {n: str(p) for n, p in dirs.items()},
                                                  "options": asdict(opts)})
            config = ServerConfig("pipeline.service.app:from_env", factory=True, workers=opts.workers, **common)
            if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn takes the target too
                supervisor = Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock])
            else:
                supervisor = Multiprocess(config, sockets=[sock])
            run: Callable[[], None] = supervisor.run
        else:
            from .app import create_app

            server = uvicorn.Server(ServerConfig(create_app(dirs, opts), **common))
            run = partial(server.run, sockets=[sock])
        if opts.host not in ("127.0.0.1", "::1", "localhost") and not opts.token:
            log.warning("serving on %s without --token: anyone who can reach this address can query the indexes "
                        "and read their images", opts.host)
        if ready:
            ready(url_of(sock))
        run()
    finally:
        sock.close()
