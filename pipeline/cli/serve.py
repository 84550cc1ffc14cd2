"""`embedpipe serve`: nearest-neighbour lookup over HTTP (and a web page) for one or more indexes."""
from __future__ import annotations

from typing import Any

import click

from ..config import config_option
from ..service.options import TOKEN_ENV, ServeOptions
from .group import cli

D = ServeOptions  # the defaults shown here are the service's own


@cli.command()
@click.argument("index_dirs", nargs=-1, required=True)
@click.option("--host", default=D.host, show_default=True, help="Address to listen on; 0.0.0.0 exposes the service (set --token).")
@click.option("--port", type=int, default=D.port, show_default=True, help="TCP port (0: any free one, printed at start).")
@click.option("--token", envvar=TOKEN_ENV, default=None, show_envvar=True, help="Bearer token every route requires (the page: open /?token=TOKEN once).")
@click.option("--max-body-mb", type=float, default=D.max_body_mb, show_default=True, help="Largest request body (uploaded images included).")
@click.option("--max-pixels", type=int, default=D.max_pixels, show_default=True, help="Refuse uploaded images whose header claims more pixels (decompression bombs).")
@click.option("--max-k", type=int, default=D.max_k, show_default=True, help="Largest k a request may ask for.")
@click.option("--max-queries", type=int, default=D.max_queries, show_default=True, help="Most keys, vectors or images in one request.")
@click.option("--batch-wait-ms", type=float, default=D.batch_wait_ms, show_default=True, help="How long an image query waits for others to share its model call.")
@click.option("--max-batch", type=int, default=D.max_batch, show_default=True, help="Most images in one model call.")
@click.option("--threads", type=int, default=D.threads, show_default=True, help="Search/decode threads (0: one per core).")
@click.option("--reload-every", type=float, default=D.reload_every, show_default=True, help="Seconds between checks for an index swapped by `index --update` (0: never).")
@click.option("--device", default=D.device, show_default=True, help="Device of the image model (auto: CUDA if available).")
@click.option("--cache-mb", type=int, default=D.cache_mb, show_default=True, help="Memory for decoded embedding files (key queries, captions).")
@click.option("--workers", type=int, default=D.workers, show_default=True, help="Processes sharing the port, each holding its own copy of the indexes.")
@click.option("--max-connections", type=int, default=D.max_connections, show_default=True, help="Open connections per process; past it the one waiting longest for a request is closed.")
@click.option("--max-concurrent", type=int, default=D.max_concurrent, show_default=True, help="Requests answered at once per process (idle connections do not count); past it a 503.")
@click.option("--header-timeout", type=float, default=D.header_timeout, show_default=True, help="Seconds a client has to send a request's headers (then the connection is closed), and a body may wait for room (then a 503).")
@click.option("--body-timeout", type=float, default=D.body_timeout, show_default=True, help="Seconds a body may take to arrive once its reading starts; then a 408.")
@click.option("--keep-alive", type=float, default=D.keep_alive, show_default=True, help="Seconds an idle connection stays open after an answer.")
@click.option("--body-memory-mb", type=float, default=D.body_memory_mb, show_default=True, help="Request bodies read and parsed at once per process; others wait for room.")
@click.option("--trust-model", "trust_models", multiple=True, metavar="FILE", help="A model file (TorchScript, or weights) an index's embedding_meta may name for image queries (repeatable); its sha256 is checked against the index. Library models need none.")
@click.option("--thumb-timeout", type=float, default=D.thumb_timeout, show_default=True, help="Seconds a thumbnail may take to read from a remote (http, https...) shard; then 504.")
@click.option("--thumb-threads", type=int, default=D.thumb_threads, show_default=True, help="Remote thumbnail reads at once (their own pool: searches never wait for them).")
@config_option
def serve(index_dirs: tuple[str, ...], **options: Any) -> None:
    """Serve nearest-neighbour lookups in INDEX_DIR (or NAME=INDEX_DIR; several allowed) over HTTP, with a page at /.

    Routes: GET / (the page), GET /healthz, GET /indexes, POST /search (JSON: keys, vectors or base64 images;
    or multipart image files), GET /thumb/INDEX/KEY. Needs `pip install 'embedpipe[serve]'`.

    \b
    Examples:
      embedpipe serve runs/a/index                           # http://127.0.0.1:8000/
      EMBEDPIPE_SERVE_TOKEN=$(openssl rand -hex 16) embedpipe serve a=runs/a/index b=runs/b/index --host 0.0.0.0
      curl -s localhost:8000/search -H 'content-type: application/json' -d '{"keys": ["000123"], "k": 5}'
      curl -s localhost:8000/search -F image=@cat.jpg -F k=5
    """
    from ..service.run import serve as run

    run(list(index_dirs), ready=lambda url: click.echo(f"serving {len(index_dirs)} index(es) at {url}", err=True),
        **options)
