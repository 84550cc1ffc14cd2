"""Run the service on uvicorn: bind the socket first (so port 0 gives a free port and errors come before loading),
then serve until interrupted."""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from .options import ServeOptions

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), with a clear error when it is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} cannot be resolved: {e}") from None
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one)") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(indexes: Sequence[str | Path], ready: Callable[[str], None] | None = None, **options: Any) -> None:
    """Serve ``indexes`` over HTTP until interrupted (Ctrl-C, SIGTERM); ``ready(url)`` once it listens.

    ``options`` are :class:`ServeOptions` fields (``host``, ``port``, ``token``, ``max_body_mb``, ...).
    """
    import uvicorn

    from .app import create_app

    opts = ServeOptions(**options)
    opts.validate()
    sock = listen(opts.host, opts.port)
    try:
        app = create_app(indexes, opts)
        server = uvicorn.Server(uvicorn.Config(
            app, log_level=logging.getLogger().getEffectiveLevel(), lifespan="on", server_header=False,
            # The access log would show the /?token=... of the page's login: on only when everyone's INFO is (-vv).
            access_log=logging.getLogger().isEnabledFor(logging.INFO), limit_concurrency=opts.max_connections,
            timeout_graceful_shutdown=30))
        if opts.host not in ("127.0.0.1", "::1", "localhost") and not opts.token:
            log.warning("serving on %s without --token: anyone who can reach this address can query the indexes "
                        "and read their images", opts.host)
        if ready:
            ready(url_of(sock))
        server.run(sockets=[sock])
    finally:
        sock.close()
