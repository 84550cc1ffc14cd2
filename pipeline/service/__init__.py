"""``embedpipe serve``: nearest-neighbour lookup over HTTP, with a web page, for indexes built by ``embedpipe index``.

    options.py   ServeOptions (defaults, limits), index names
    catalog.py   the loaded indexes and their hot reload when ``index --update`` swaps a directory (each new
                 version loaded and probed before it is swapped in)
    queries.py   POST /search bodies -> a checked Query
    answer.py    a Query answered from one loaded index (captions, urls, thumbnail links)
    batcher.py   image queries batched into one model call
    thumbs.py    thumbnails read back from the shards the index records
    guard.py     requests answered at once, bearer token (ASGI middleware)
    bodies.py    request bodies: size limit, memory of those in flight, time to arrive (ASGI middleware)
    protocol.py  uvicorn's HTTP protocol with a header deadline and a cap on open connections
    remote.py    one image read from a remote shard within a deadline (for thumbnails)
    page.py      the page at /
    app.py       the Starlette app (``create_app``, mountable in another ASGI app)
    run.py       ``serve``: the app on uvicorn

Starlette and uvicorn come with the ``embedpipe[serve]`` extra; the modules that import them are imported only
once serving (``create_app``, ``serve``) starts.
"""
from __future__ import annotations

from typing import Any

from .options import ServeOptions
from .run import serve

__all__ = ["ServeOptions", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use: it needs the optional Starlette
        from .app import create_app

        return create_app
    raise AttributeError(name)
