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
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~/-]*")  # keys that need no quoting in a url path (most do not)


def answer(served: Served, q: Query, x: np.ndarray | None, root: str = "") -> dict[str, Any]:
    """The JSON answer to ``q``; ``x`` are the embeddings of its images (when it has images)."""
    idx = served.index
    exclude = None
    if q.keys:
        ids = idx.known_ids(q.keys)
        missing = [k for k, i in zip(q.keys, ids) if i < 0]
        if missing:
            raise NotFound(f"{len(missing)} key(s) not in the index {served.name}: {missing[:5]}")
        x, names, exclude, where = idx.vectors(ids), list(q.keys), ids, "stored vectors"
    elif q.vectors is not None:
        names, where = [f"vectors[{i}]" for i in range(len(q.vectors))], "vectors"
        x = q.vectors
    else:
        names, where = [name for name, _ in q.images], f"the embedding of image {q.images[0][0]}"
    return _replies(served, [q], _search(served, q, x, names, exclude, where), root)[0]


def answer_together(served: Served, qs: list[Query], root: str = "") -> list[dict[str, Any]]:
    """The answers to several key queries, or several vector queries, of one ``k`` and ``include_self`` and no
    filter, from one FAISS search of all their rows. Raises if any of them is bad (the caller then answers
    them one by one, so that each gets its own error)."""
    idx = served.index
    if qs[0].keys:
        names = [k for q in qs for k in q.keys]
        ids = idx.known_ids(names)
        if (ids < 0).any():
            raise NotFound("a key is missing")  # answered one by one: each request names its own missing keys
        x, exclude, where = idx.vectors(ids), ids, "stored vectors"
    else:
        x = np.concatenate([q.vectors for q in qs]) if len(qs) > 1 else qs[0].vectors
        names = [f"vectors[{i}]" for q in qs for i in range(len(q.vectors))]
        exclude, where = None, "vectors"
    return _replies(served, qs, _search(served, qs[0], x, names, exclude, where), root)  # one k, flags, no filter


def _replies(served: Served, qs: list[Query], records: list[dict[str, Any]], root: str) -> list[dict[str, Any]]:
    """One answer per query of ``qs`` from ``records`` (their rows, in order), with captions, urls and thumbnails."""
    thumb = f"{root}/thumb/{quote(served.name)}/"
    _describe(served, [h for r in records for h in r["results"]], thumb)
    out, start = [], 0
    for q in qs:
        mine = records[start:start + len(q)]
        start += len(q)
        if q.keys:
            for r in mine:
                r["thumb"] = thumb + _quoted(r["query"])
        out.append({"index": served.name, "generation": served.generation, "count": served.index.count,
                    "kind": q.kind, "k": q.k, "results": mine})
    return out


def _search(served: Served, q: Query, x: np.ndarray, names: list[str], exclude: np.ndarray | None,
            where: str) -> list[dict[str, Any]]:
    """``SearchResult.records()``; with a shard filter, fetched deeper until k hits pass it (or FILTER_FETCH)."""
    idx = served.index
    fetch = q.k
    while True:
        try:
            res = idx.search(x, fetch, queries=names, exclude_ids=exclude, include_self=q.include_self, where=where)
        except UserError as e:  # the index names its directory; a client needs the index's name
            raise UserError(str(e).replace(str(idx.path), served.name)) from None
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
        h["thumb"] = thumb + _quoted(h["key"])


def _quoted(key: str) -> str:
    return key if _URL_SAFE.fullmatch(key) else quote(key)


