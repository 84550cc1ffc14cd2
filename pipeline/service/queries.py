"""``POST /search`` bodies -> one checked :class:`Query`; anything malformed is a 4xx with a message that says why.

A body is JSON (``keys``, ``vectors``, base64 ``images`` or ``texts``) or multipart (``key``, ``text`` fields or
``image`` files). Nothing in a request names a file: keys are looked up in the index's id table, images arrive as
bytes, texts are embedded by the text tower of the index's image-text model.
"""
from __future__ import annotations

import base64
import binascii
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from . import wire
from .options import ServeOptions

JSON_FIELDS = ("index", "k", "keys", "vectors", "images", "texts", "include_self", "filter")
FORM_FIELDS = ("index", "k", "key", "key_shard", "image", "text", "include_self", "shard")
MAX_TEXT = 4096  # characters in one text query: a tokenizer keeps the first 77 tokens; more is a mistake
DEFAULT_K = 10


@dataclass
class Query:
    """One search request: exactly one of keys, vectors, images or texts, and how many neighbours of each."""

    index: str | None
    k: int
    keys: list[str]
    vectors: np.ndarray | None
    images: list[tuple[str, bytes]]  # (name for messages, encoded bytes)
    include_self: bool = False
    shards: frozenset[str] | None = None  # keep only hits from these shards (url or file name)
    key_shards: list[str | None] | None = None  # per key: the shard holding it, for a key several shards hold
    texts: list[str] = field(default_factory=list)  # text queries, for the text tower of an image-text model

    @property
    def kind(self) -> str:
        return ("keys" if self.keys else "vectors" if self.vectors is not None else "texts" if self.texts
                else "images")

    @property
    def needs_model(self) -> bool:
        """Its queries are embedded by the index's model (images, texts) before the search."""
        return bool(self.images or self.texts)

    def __len__(self) -> int:
        """How many queries (keys, vectors, images or texts) the request holds."""
        return (len(self.keys) or len(self.images) or len(self.texts)
                or (len(self.vectors) if self.vectors is not None else 0))


def bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status, message)


def shown(value: Any) -> str:
    """``value`` in a message, cut short: a client's value can be megabytes long, or nested thousands deep (which
    ``repr`` cannot show)."""
    return reprlib.repr(value)


class _InMemoryParser(MultiPartParser):
    # Uploads stay in memory (bounded by the request size limit) instead of spilling to temporary files:
    # no route of the service writes to disk.
    spool_max_size = 1 << 62


async def read(request: Request, opts: ServeOptions) -> bytearray | Query:
    """A ``POST /search`` request's JSON body (decoded later, off the event loop, by :func:`from_bytes`) or its
    parsed multipart form."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return await body_of(request)
    if ctype == "multipart/form-data":
        return await from_form(request, opts)
    raise bad(f"POST /search takes application/json or multipart/form-data, not {ctype or 'no content-type'!r}", 415)


async def body_of(request: Request) -> bytearray:
    """The whole body, gathered in one buffer (``Request.body`` keeps the chunks until it joins them: twice the
    body's size at its peak)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def from_bytes(body: bytes | bytearray, opts: ServeOptions, dim: int | None = None) -> Query:
    """The query of a JSON body; with ``dim`` (the largest served), one holding more values than ``max_queries``
    vectors of that dimension is refused before it is parsed."""
    if dim is not None:
        most = opts.max_queries * (dim + 1) + 64  # the vectors' numbers, and what the other fields hold
        # Each value but the last of an array or object is followed by a comma: a count at C speed bounds them
        # before parsing makes each number a 24-byte Python float in an 8-byte list slot.
        if body.count(b",") > most:
            raise bad(f"the body holds more than the {most} values that {opts.max_queries} queries (--max-queries) "
                      f"of dimension {dim} can; send fewer queries per request", 413)
    try:
        obj = wire.loads(body)
    except wire.DecodeError as e:
        raise bad(f"the body is not valid JSON: {e}") from None
    return from_json(obj, opts)


def _counted(q: Query, opts: ServeOptions) -> Query:
    n = len(q)
    if n > opts.max_queries:
        raise bad(f"{n} queries in one request; at most {opts.max_queries} (--max-queries)", 413)
    return q


def _k(value: Any, opts: ServeOptions) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= opts.max_k:
        raise bad(f"k must be an integer in 1..{opts.max_k}, got {shown(value)}")
    return value


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise bad(f"{name} must be true or false, got {shown(value)}")


def _strings(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad(f"{name} must be a non-empty string or a list of them")
    return value


def _keys(value: Any) -> tuple[list[str], list[str | None] | None]:
    """``keys``: a key, or a list of keys and ``{"key": K, "shard": S}`` objects (a key several shards hold: S,
    the shard's url, the end of its path or its file name, picks one)."""
    keys: list[str] = []
    shards: list[str | None] = []
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, dict) and "key" in v and set(v) <= {"key", "shard"}:
            key, shard = v["key"], v.get("shard")
            if not (isinstance(key, str) and key) or not (shard is None or isinstance(shard, str) and shard):
                raise bad("a {\"key\": KEY, \"shard\": SHARD} item takes a non-empty string for each")
        elif isinstance(v, str) and v:
            key, shard = v, None
        else:
            raise bad("keys must be a key or a list of keys (strings) and {\"key\": KEY, \"shard\": SHARD} objects")
        keys.append(key)
        shards.append(shard)
    return keys, shards if any(s is not None for s in shards) else None


def _vectors(value: Any) -> np.ndarray:
    try:
        x = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise bad("vectors must be a list of equally long lists of numbers") from None
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise bad(f"vectors must be a list of equally long lists of numbers, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise bad("vectors hold NaN or infinite values")
    return x


def _image(value: Any, i: int) -> tuple[str, bytes]:
    name, data = f"images[{i}]", value
    if isinstance(value, dict):
        name, data = str(value.get("name") or name), value.get("data")
    if not isinstance(data, str):
        raise bad(f"{name} must be a base64 string (or {{\"name\": ..., \"data\": base64}})")
    if data.startswith("data:"):  # a data URI, as a browser's FileReader gives it
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{name} is not valid base64") from None
    if not raw:
        raise bad(f"{name} is empty")
    return name, raw


def _texts(value: Any) -> list[str]:
    texts = _strings(value, "texts")
    if any(not t.strip() for t in texts):
        raise bad("texts must be non-empty strings, e.g. {\"texts\": [\"a red car\"]}")
    long = next((t for t in texts if len(t) > MAX_TEXT), None)
    if long is not None:
        raise bad(f"a text query of {len(long)} characters; at most {MAX_TEXT} (its model reads the first few dozen "
                  "words)")
    return texts


def _one_kind(keys: list[str], vectors: np.ndarray | None, images: list[tuple[str, bytes]],
              texts: list[str] = ()) -> None:
    given = sum(map(bool, (keys, vectors is not None, images, texts)))
    if given != 1:
        raise bad("give exactly one kind of query: \"keys\" (indexed items), \"vectors\" (embeddings of the index's "
                  "model), \"images\" (base64, or multipart image files) or \"texts\" (for an image-text model)")


def from_json(body: Any, opts: ServeOptions) -> Query:
    """A query from a decoded JSON body; unknown fields are refused so that a typo is not silently ignored."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object, e.g. {\"keys\": [\"000123\"], \"k\": 10}")
    unknown = sorted(set(body) - set(JSON_FIELDS))
    if unknown:
        raise bad(f"unknown field(s) {shown(unknown)}; a search takes {', '.join(JSON_FIELDS)}")
    keys, key_shards = _keys(body["keys"]) if body.get("keys") is not None else ([], None)
    vectors = _vectors(body["vectors"]) if body.get("vectors") is not None else None
    images_in = body.get("images") or []
    if not isinstance(images_in, list):
        images_in = [images_in]
    images = [_image(v, i) for i, v in enumerate(images_in)]
    texts = _texts(body["texts"]) if body.get("texts") is not None else []
    _one_kind(keys, vectors, images, texts)
    index = body.get("index")
    if index is not None and not isinstance(index, str):
        raise bad("index must be the name of an index (GET /indexes lists them)")
    filt = body.get("filter") or {}
    if not isinstance(filt, dict) or set(filt) - {"shard"}:
        raise bad("filter takes {\"shard\": [shard url or file name, ...]}")
    shards = frozenset(_strings(filt["shard"], "filter.shard")) if "shard" in filt else None
    return _counted(Query(index, _k(body.get("k", DEFAULT_K), opts), keys, vectors, images,
                          _flag(body.get("include_self", False), "include_self"), shards, key_shards, texts), opts)


async def from_form(request: Request, opts: ServeOptions) -> Query:
    """A query from a multipart form: ``key`` or ``text`` fields or ``image`` files, with ``index``, ``k``, ``shard``."""
    parser = _InMemoryParser(request.headers, request.stream(), max_files=opts.max_queries,
                             max_fields=4 * opts.max_queries + 8, max_part_size=1 << 20)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise bad(f"malformed multipart body: {e.message}") from None
    try:
        unknown = sorted({name for name, _ in form.multi_items()} - set(FORM_FIELDS))
        if unknown:
            raise bad(f"unknown form field(s) {shown(unknown)}; a search takes {', '.join(FORM_FIELDS)}")
        images = []
        for i, f in enumerate(form.getlist("image")):
            if not isinstance(f, UploadFile):
                raise bad("image must be an uploaded file (multipart file field)")
            data = await f.read()
            if not data:
                raise bad(f"image {f.filename or i} is empty")
            images.append((f.filename or f"image[{i}]", data))
        keys = [str(v) for v in form.getlist("key") if str(v)]
        texts = _texts([str(v) for v in form.getlist("text")]) if form.getlist("text") else []
        _one_kind(keys, None, images, texts)
        shards = frozenset(map(str, form.getlist("shard"))) or None
        key_shard = str(form.get("key_shard") or "") or None
        if key_shard is not None and not keys:
            raise bad("key_shard picks the shard of a key query; give the key too")
        index = form.get("index") or None
        if index is not None and not isinstance(index, str):
            raise bad("index must be the name of an index (GET /indexes lists them)")
        return _counted(Query(index, _k(form.get("k", DEFAULT_K), opts), keys, None, images,
                              _flag(form.get("include_self", "false"), "include_self"), shards,
                              [key_shard] * len(keys) if key_shard else None, texts), opts)
    finally:
        await form.close()
