"""The ASGI app of ``embedpipe serve``: routes, the thread pools, and errors as 4xx JSON (never a traceback).

Routes: ``GET /`` (the page), ``GET /healthz``, ``GET /indexes``, ``POST /search``, ``GET /thumb/{index}/{key}``.
Nothing here writes a file, and no route opens a path taken from a request.

The event loop only parses and answers: FAISS searches, key lookups, stored-column reads, image decoding and
thumbnails run in a pool of ``threads`` (FAISS releases the GIL), and the models run on their own thread, fed by
one :class:`~pipeline.service.batcher.Batcher` per model: one for the image tower, one for the text tower.
Thumbnails of remote shards are read on a pool of their own (``thumb_threads``), each within ``thumb_timeout``:
a slow host never holds a search thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import UserError
from ..model.trust import TrustedFiles, UntrustedModel
from ..records import EmbeddingMeta
from . import queries, wire
from .answer import answer, answer_together
from .batcher import Batcher
from .catalog import Catalog, NotFound, Served
from .coalesce import Coalescer, Pending
from .bodies import LimitBody
from .guard import LimitConcurrency, RequireToken
from .options import WORKERS_ENV, ServeOptions, index_names
from .page import PAGE
from .remote import ShardTimeout
from .thumbs import ShardImages

log = logging.getLogger(__name__)


class Service:
    """What the routes share: the indexes, the pools, the image embedders (one per model) and their batchers."""

    def __init__(self, dirs: dict[str, Path], options: ServeOptions):
        self.options = options
        self.catalog = Catalog(dirs, options)
        self.pool = ThreadPoolExecutor(options.pool_size, thread_name_prefix="embedpipe-search",
                                       initializer=_searches_on_one_thread)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="embedpipe-model")
        self.embedders: dict[str, Any] = {}  # model record (json) -> ImageEmbedder, built on first image query
        self.batchers: dict[tuple[str, int], Batcher] = {}  # (model record, event loop) -> Batcher
        self.text_embedders: dict[str, Any] = {}  # model record -> TextEmbedder, built on first text query
        self.text_batchers: dict[tuple[str, int], Batcher] = {}
        self.coalescers: dict[int, Coalescer] = {}  # event loop -> the JSON searches' Coalescer
        self.thumbs = ShardImages(options.max_pixels, timeout=options.thumb_timeout)
        self.trusted = TrustedFiles.of(options.trust_models)
        self.remote_pool = ThreadPoolExecutor(options.thumb_threads, thread_name_prefix="embedpipe-remote")
        self.started = time.time()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the search pool, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.catalog.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.remote_pool.shutdown(wait=False, cancel_futures=True)

    async def thumbnail(self, shard: str, key: str) -> bytes | None:
        """A thumbnail: local shards on the search pool, remote ones on their own pool within the timeout."""
        if not self.thumbs.is_remote(shard):
            return await self.run(self.thumbs.thumbnail, shard, key)
        kept, jpeg = self.thumbs.recent(shard, key)
        if kept:
            return jpeg
        read = asyncio.get_running_loop().run_in_executor(self.remote_pool, self.thumbs.thumbnail, shard, key)
        try:  # waiting for a free remote thread counts too (a read still queued is cancelled)
            return await asyncio.wait_for(read, self.options.thumb_timeout + 0.5)
        except asyncio.TimeoutError:
            raise ShardTimeout(f"the thumbnail of {key!r} was not read from {shard} within "
                               f"{self.options.thumb_timeout:g} s (--thumb-timeout; other remote reads were "
                               "waiting too)") from None

    def _embedder(self, model: str, meta: EmbeddingMeta) -> Any:
        """On the model thread (so one build at a time): the embedder of this model, built on first use."""
        if model not in self.embedders:
            from ..model.rebuild import ImageEmbedder

            self._share_cores()
            log.info("building the image model %s for queries (first image query)", meta.model)
            self.embedders[model] = ImageEmbedder(meta, self.options.device, self.options.max_pixels)
        return self.embedders[model]

    async def embed(self, served: Served, images: Sequence[tuple[str, bytes]]) -> np.ndarray:
        """Embeddings of uploaded images with the index's model, batched with other requests' images."""
        meta = served.index.record.embedding_meta
        if meta is None:
            raise UserError(f"the index {served.name} records no embedding model, so images cannot be embedded "
                            "like its vectors; query it with vectors or keys")
        self.trusted.check(meta.identity, served.name)  # before anything reads a file the index names
        model = meta.rebuild_key()
        loop = asyncio.get_running_loop()
        emb = await loop.run_in_executor(self.model_thread, self._embedder, model, meta)
        served.index.check_model(emb.identity, f"the model rebuilt for {served.name}",
                                 "rebuild the index with the model installed here")
        prepared = await self.run(lambda: [emb.prepare(data, name) for name, data in images])
        key = (model, id(loop))
        if key not in self.batchers:
            self.batchers[key] = Batcher(emb.embed, self.model_thread, self.options.batch_wait_ms / 1000,
                                         self.options.max_batch)
        return await self.batchers[key].embed(prepared)

    def _share_cores(self) -> None:
        from ..model.device import set_cpu_threads

        # N processes each running the model on every usable CPU would thrash: each gets its part
        set_cpu_threads(share=self.options.workers)

    def _text_embedder(self, model: str, meta: EmbeddingMeta) -> Any:
        """On the model thread: the text tower of this model, built on first use (through model/rebuild.py, as
        image models are)."""
        if model not in self.text_embedders:
            from ..model.rebuild import TextEmbedder

            self._share_cores()
            log.info("building the text tower of %s for queries (first text query)", meta.model)
            self.text_embedders[model] = TextEmbedder(meta, self.options.device)
        return self.text_embedders[model]

    async def embed_texts(self, served: Served, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of text queries with the text tower of the index's model, batched with other requests'
        texts into one text-tower call; an index whose model has none is a 400 that names it."""
        meta = served.index.record.embedding_meta
        if meta is None:
            raise UserError(f"the index {served.name} records no embedding model, so texts cannot be embedded like "
                            "its vectors; query it with vectors or keys")
        self.trusted.check(meta.identity, served.name)  # the text tower reads the files the image tower does
        model = meta.rebuild_key()
        loop = asyncio.get_running_loop()
        emb = await loop.run_in_executor(self.model_thread, self._text_embedder, model, meta)
        prepared = await self.run(lambda: [emb.prepare(t) for t in texts])
        key = (model, id(loop))
        if key not in self.text_batchers:
            self.text_batchers[key] = Batcher(emb.embed, self.model_thread, self.options.batch_wait_ms / 1000,
                                              self.options.max_batch)
        return await self.text_batchers[key].embed(prepared)

    def respond(self, served: Served, q: queries.Query, x: np.ndarray | None, root: str, t0: float) -> bytes:
        """On the pool: the JSON answer to ``q`` from this version of the index (``x``: its images' embeddings)."""
        out = answer(served, q, x, root)
        out["took_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return wire.dumps(out)

    async def search_json(self, body: bytes | bytearray, root: str, t0: float) -> bytes | queries.Query:
        """A JSON body's answer, searched together with the JSON bodies that arrive with it; or its query, when
        it has images for the model to embed first."""
        loop = asyncio.get_running_loop()
        if id(loop) not in self.coalescers:
            self.coalescers[id(loop)] = Coalescer(self.answer_all, self.pool, self.options.pool_size)
        return await self.coalescers[id(loop)].submit(body, root, t0)

    def answer_all(self, batch: list[Pending]) -> None:
        """On the pool: each request's answer (or its image query, or its error), key and vector queries of one
        index, k and flags searched as one FAISS batch."""
        groups: dict[tuple[Any, ...], tuple[Served, list[tuple[Pending, queries.Query]]]] = {}
        dim = max((s.index.dim for s in self.catalog.current.values()), default=None)
        for p in batch:
            try:
                q = queries.from_bytes(p.body, self.options, dim)
                if q.needs_model:
                    p.result = q
                    continue
                served = self.catalog.get(q.index)
                key = (id(served), q.k, q.include_self, bool(q.keys), q.shards)
                groups.setdefault(key, (served, []))[1].append((p, q))
            except Exception as e:  # this request's own error; the others go on
                p.error = e
        for (*_, shards), (served, members) in groups.items():
            if len(members) > 1 and shards is None:
                try:
                    answers = answer_together(served, [q for _, q in members], members[0][0].root)
                except Exception:  # one bad request in the group: answer each alone, each with its own error
                    pass
                else:
                    for (p, _), out in zip(members, answers):
                        out["took_ms"] = round((time.perf_counter() - p.t0) * 1000, 3)
                        p.result = wire.dumps(out)
                    continue
            for p, q in members:
                try:
                    p.result = self.respond(served, q, None, p.root, p.t0)
                except Exception as e:
                    p.error = e

    def search_stats(self) -> dict[str, Any]:
        batches = sum(c.batches for c in self.coalescers.values())
        requests = sum(c.requests for c in self.coalescers.values())
        return {"batches": batches, "requests": requests,
                "mean_batch": round(requests / batches, 2) if batches else None}

    def image_stats(self) -> dict[str, Any]:
        batches = sum(b.batches for b in self.batchers.values())
        images = sum(b.images for b in self.batchers.values())
        return {"batches": batches, "images": images, "mean_batch": round(images / batches, 2) if batches else None}

    def text_stats(self) -> dict[str, Any]:
        batches = sum(b.batches for b in self.text_batchers.values())
        texts = sum(b.images for b in self.text_batchers.values())  # a Batcher counts the items it embedded
        return {"batches": batches, "texts": texts, "mean_batch": round(texts / batches, 2) if batches else None}


def _searches_on_one_thread() -> None:
    """A pool thread's FAISS searches use that thread alone (OpenMP's thread count is per calling thread): the
    pool already spreads concurrent requests over the cores, and an OpenMP team per pool thread would put
    several spinning threads on each core."""
    import faiss

    faiss.omp_set_num_threads(1)


def _service(request: Request) -> Service:
    return request.app.state.service


async def get_page(request: Request) -> Response:
    return HTMLResponse(PAGE, headers={"cache-control": "no-store", "x-content-type-options": "nosniff",
                                       "content-security-policy": "default-src 'self'; img-src 'self' blob:; "
                                                                  "style-src 'unsafe-inline'; "
                                                                  "script-src 'unsafe-inline'"})


async def get_healthz(request: Request) -> Response:
    svc = _service(request)
    cat = svc.catalog
    # "degraded": still serving, but an index's newest version could not be loaded (reload_errors says why)
    return JSONResponse({"status": "degraded" if cat.reload_errors else "ok", "uptime_s": round(time.time() - svc.started, 1),
                         "indexes": {n: {"generation": s.generation, "count": s.index.count}
                                     for n, s in cat.current.items()},
                         "reloads": cat.reloads, "reload_errors": cat.reload_errors, "image_queries": svc.image_stats(),
                         "text_queries": svc.text_stats(), "json_searches": svc.search_stats()})


async def get_indexes(request: Request) -> Response:
    return JSONResponse({"indexes": [s.info() for s in _service(request).catalog.current.values()]})


async def post_search(request: Request) -> Response:
    svc = _service(request)
    t0 = time.perf_counter()
    root = request.scope.get("root_path", "")
    got = await queries.read(request, svc.options)
    if isinstance(got, bytearray):  # JSON: decoded, searched and encoded in one trip to the pool, unless it needs
        got = await svc.search_json(got, root, t0)  # the model (images, texts)
        if isinstance(got, bytes):
            return Response(got, media_type="application/json")
    served = svc.catalog.get(got.index)
    x = (await svc.embed(served, got.images) if got.images else await svc.embed_texts(served, got.texts) if got.texts
         else None)
    return Response(await svc.run(svc.respond, served, got, x, root, t0), media_type="application/json")


async def get_thumb(request: Request) -> Response:
    svc = _service(request)
    served = svc.catalog.get(request.path_params["index"])
    key = request.path_params["key"] or request.query_params.get("key", "")  # ?key= for a dot-segment key
    # the key (and the shard that picks among rows sharing it) is looked up in the id table, never used as a path
    try:
        rows = served.index.find_keys([key], request.query_params.get("shard"))[0]
    except UserError:
        raise NotFound(f"no key {key!r} in the index {served.name}"
                       + (f" in a shard matching {request.query_params['shard']!r}"
                          if "shard" in request.query_params else "")) from None
    if len(rows.ids) > 1:
        raise UserError(f"key {key!r} is in {len(rows.ids)} shards of the index {served.name}; pick one with "
                        f"?shard= (its url, the end of its path or its file name): {rows.shards[:3]}")
    shard = rows.shards[0]
    jpeg = await svc.thumbnail(shard, key)
    if jpeg is None:
        raise NotFound(f"the image of {key!r} could not be read back from its shard {Path(shard).name}")
    return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


async def on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def on_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away before its body was complete: no one to answer, nothing wrong here (no traceback).
    log.debug("%s %s: the client closed the connection before sending its whole body", request.method,
              request.url.path)
    return _error(400, "the client closed the connection before sending its whole body")


async def on_user(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))


async def on_not_found(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc))


async def on_untrusted(request: Request, exc: Exception) -> Response:
    return _error(403, str(exc))


async def on_timeout(request: Request, exc: Exception) -> Response:
    return _error(504, str(exc))


async def on_crash(request: Request, exc: Exception) -> Response:
    # The traceback goes to the service's log (the server logs the exception re-raised after this answer),
    # never to the client.
    return _error(500, f"internal error ({type(exc).__name__}); the service log has the details")


def create_app(indexes: Sequence[str | Path] | dict[str, str | Path], options: ServeOptions | None = None,
               **overrides: Any) -> Starlette:
    """The service as an ASGI app (mountable in another Starlette/FastAPI app); loads every index now.

    ``indexes``: directories (named after themselves), ``NAME=DIR`` strings, or ``{name: dir}``.
    ``overrides`` are :class:`ServeOptions` fields (``token``, ``max_body_mb``, ...).

    Example:
        >>> app = create_app(["runs/a/index"], token="s3cret-token")  # doctest: +SKIP
        >>> parent.mount("/similar", app)  # doctest: +SKIP
    """
    opts = ServeOptions(**{**(options.__dict__ if options else {}), **overrides})
    opts.validate()
    dirs = ({n: Path(p) for n, p in indexes.items()} if isinstance(indexes, dict)
            else index_names(list(indexes)))
    svc = Service(dirs, opts)
    svc.catalog.start()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        svc.close()

    # Outermost first: a request beyond the concurrency limit is refused before anything else; the token before
    # any body is read; a body only once it fits the memory for bodies.
    middleware = [Middleware(LimitConcurrency, limit=opts.max_concurrent),
                  Middleware(LimitBody, limit=opts.max_body, budget=opts.body_memory, wait=opts.header_timeout,
                             timeout=opts.body_timeout)]
    if opts.token:
        middleware.insert(1, Middleware(RequireToken, token=opts.token))
    app = Starlette(
        routes=[Route("/", get_page), Route("/healthz", get_healthz), Route("/indexes", get_indexes),
                Route("/search", post_search, methods=["POST"]), Route("/thumb/{index}/{key:path}", get_thumb)],
        middleware=middleware, lifespan=lifespan,
        exception_handlers={HTTPException: on_http, UserError: on_user, NotFound: on_not_found,
                            ClientDisconnect: on_disconnect, UntrustedModel: on_untrusted, ShardTimeout: on_timeout,
                            Exception: on_crash})
    app.state.service = svc
    return app


def from_env() -> Starlette:
    """The app of one worker process of ``embedpipe serve --workers N`` (uvicorn imports and calls this in each)."""
    args = json.loads(os.environ[WORKERS_ENV])
    return create_app(args["indexes"], ServeOptions(**args["options"]))
