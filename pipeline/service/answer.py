"""One search, answered from one loaded version of an index (runs on the search pool, off the event loop).

Each hit carries what the index records of it (key, score, shard, index in the shard, id), the caption
(``txt``) and url (``json``'s ``url``) when the embedding files kept them, and the url of its thumbnail.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np

from ..errors import UserError
from .catalog import NotFound, Served
from .queries import Query

FILTER_FETCH = 4096  # with a shard filter, candidates are fetched up to this many per query before filtering
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")  # keys that need no quoting in a url path segment (most do not)


def answer(served: Served, q: Query, x: np.ndarray | None, root: str = "") -> dict[str, Any]:
    """The JSON answer to ``q``; ``x`` are the embeddings of its images or texts (when it has them)."""
    idx = served.index
    exclude = qshards = None
    if q.keys:
        ids, names, qshards = key_rows(served, q)
        x, exclude, where = idx.vectors(ids), ids, "stored vectors"
    elif q.vectors is not None:
        names, where = [f"vectors[{i}]" for i in range(len(q.vectors))], "vectors"
        x = q.vectors
    elif q.texts:
        names, where = list(q.texts), "the text embedding"
    else:
        names, where = [name for name, _ in q.images], f"the embedding of image {q.images[0][0]}"
    records = _search(served, q, x, names, exclude, where, qshards)
    return _replies(served, [q], records, root, [len(records)])[0]


def key_rows(served: Served, q: Query) -> tuple[np.ndarray, list[str], list[str]]:
    """The rows a key query names: its ids, its keys and their shards (a key several shards hold, without a
    shard to pick one, is answered for each)."""
    try:
        rows = served.index.find_keys(q.keys, q.key_shards)
    except UserError as e:  # the index names its directory; a client needs the index's name
        raise NotFound(str(e).replace(str(served.index.path), served.name)) from None
    ids = np.concatenate([r.ids for r in rows])
    return ids, [r.key for r in rows for _ in r.ids], [s for r in rows for s in r.shards]


def answer_together(served: Served, qs: list[Query], root: str = "") -> list[dict[str, Any]]:
    """The answers to several key queries, or several vector queries, of one ``k`` and ``include_self`` and no
    filter, from one FAISS search of all their rows. Raises if any of them is bad (the caller then answers
    them one by one, so that each gets its own error)."""
    idx = served.index
    qshards = None
    if qs[0].keys:
        found = [key_rows(served, q) for q in qs]  # a missing key raises: answered one by one, each names its own
        sizes = [len(ids) for ids, _, _ in found]
        ids = np.concatenate([ids for ids, _, _ in found])
        names = [n for _, ns, _ in found for n in ns]
        qshards = [s for _, _, ss in found for s in ss]
        x, exclude, where = idx.vectors(ids), ids, "stored vectors"
    else:
        x = np.concatenate([q.vectors for q in qs]) if len(qs) > 1 else qs[0].vectors
        names = [f"vectors[{i}]" for q in qs for i in range(len(q.vectors))]
        exclude, where, sizes = None, "vectors", [len(q) for q in qs]
    records = _search(served, qs[0], x, names, exclude, where, qshards)  # one k, flags, no filter
    return _replies(served, qs, records, root, sizes)


def _replies(served: Served, qs: list[Query], records: list[dict[str, Any]], root: str, sizes: list[int]
             ) -> list[dict[str, Any]]:
    """One answer per query of ``qs`` from ``records`` (``sizes[i]`` rows each, in order), with captions, urls and
    thumbnails."""
    thumb = f"{root}/thumb/{quote(served.name)}/"
    _describe(served, [h for r in records for h in r["results"]], thumb)
    out, start = [], 0
    for q, size in zip(qs, sizes):
        mine = records[start:start + size]
        start += size
        if q.keys:
            for r in mine:
                r["thumb"] = thumb_url(served, thumb, r["query"], r["query_shard"])
        out.append({"index": served.name, "generation": served.generation, "count": served.index.count,
                    "kind": q.kind, "k": q.k, "results": mine})
    return out


def _search(served: Served, q: Query, x: np.ndarray, names: list[str], exclude: np.ndarray | None,
            where: str, query_shards: list[str] | None = None) -> list[dict[str, Any]]:
    """``SearchResult.records()``; with a shard filter, fetched deeper until k hits pass it (or FILTER_FETCH)."""
    idx = served.index
    fetch = q.k
    while True:
        try:
            res = idx.search(x, fetch, queries=names, exclude_ids=exclude, include_self=q.include_self, where=where)
        except UserError as e:  # the index names its directory; a client needs the index's name
            raise UserError(str(e).replace(str(idx.path), served.name)) from None
        res.query_shards = query_shards
        records = res.records()
        if q.shards is None:
            return records
        for r in records:
            r["results"] = [h for h in r["results"] if h["shard"] in q.shards
                            or PurePosixPath(h["shard"]).name in q.shards]
        if all(len(r["results"]) >= q.k for r in records) or fetch >= min(idx.count, FILTER_FETCH):
            break
        fetch = min(fetch * 8, idx.count, FILTER_FETCH)
    for r in records:
        r["results"] = r["results"][:q.k]
        for rank, h in enumerate(r["results"], 1):
            h["rank"] = rank
    return records


def _describe(served: Served, hits: list[dict[str, Any]], thumb: str) -> None:
    """Add ``caption``/``url`` (when the embedding files kept ``txt``/``json``) and ``thumb`` to each hit."""
    if not hits:
        return
    for h, extra in zip(hits, served.index.describe(np.array([h["id"] for h in hits], np.int64))):
        h.update(extra)
        h["thumb"] = thumb_url(served, thumb, h["key"], h["shard"])


def thumb_url(served: Served, base: str, key: str, shard: str) -> str:
    """The thumbnail url of the row (shard, key): the key alone, unless several shards hold it.

    The key is one path segment (a ``/`` in it is quoted too), so a browser resolving the url never leaves the
    mount prefix (``dir/../../x``); a key that would be a dot segment itself goes in the query string."""
    if key in (".", ".."):
        url, sep = f"{base}?key={quote(key, safe='')}", "&"
    else:
        url, sep = base + (key if _URL_SAFE.fullmatch(key) else quote(key, safe="")), "?"
    return url + sep + "shard=" + quote(shard, safe="") if served.index.key_is_shared(key) else url


