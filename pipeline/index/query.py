"""``embedpipe search``: what a QUERY is (key, image, text, vectors file, embedding folder), and the output formats."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import store
from ..errors import UserError
from .keys import short_shard
from .text_recall import read_texts
from .search import Index, SearchResult, open_index

log = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def vectors_file(path: str | Path) -> tuple[np.ndarray, list[str | None], dict[str, Any]]:
    """Query vectors from a Parquet file with an ``embedding`` column (and optionally ``key``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--vectors {p} does not exist")
    try:
        t = pq.read_table(p)
    except pa.ArrowInvalid as e:
        raise UserError(f"--vectors {p} is not a Parquet file: {e}") from None
    if "embedding" not in t.column_names:
        raise UserError(f"--vectors {p} has no 'embedding' column (columns: {t.column_names}); write the query "
                        "vectors as a fixed_size_list<float>[D] column named 'embedding'")
    col = t.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        x = store.embedding_matrix(col)
    else:
        lens = set(pc.list_value_length(col).to_pylist())
        if len(lens) != 1:
            raise UserError(f"--vectors {p}: rows have different lengths {sorted(lens)[:5]}; every query needs D values")
        x = np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), np.float32).reshape(len(col), -1)
    keys = t.column("key").to_pylist() if "key" in t.column_names else [f"{p.name}#{i}" for i in range(len(x))]
    return x, keys, store.read_metadata(p)


def like_the_index(idx: Index, x: np.ndarray, where: str) -> np.ndarray:
    """Query vectors L2-normalised when the index holds unit vectors searched by inner product (its scores are
    cosines: raw features would score their norm, not their similarity); said when it changes them."""
    meta = idx.record.embedding_meta
    if idx.record.metric != "ip" or not (meta and meta.normalize) or not len(x):
        return x
    norms = np.linalg.norm(np.asarray(x, np.float32), axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-2):
        return x
    log.warning("--vectors %s: the query vectors have norms %.3g to %.3g; normalised, as the index's vectors are, so "
                "scores are cosine similarities", where, float(norms.min()), float(norms.max()))
    return np.asarray(x, np.float32) / np.maximum(norms, 1e-12)


def embeddings_batches(path: str | Path, batch_size: int = 4096) -> Iterator[store.Batch]:
    """Batches of a whole embedding folder, as queries (dims/dtypes/models checked like for indexing)."""
    src = store.scan(path)
    if src.rows == 0:
        raise UserError(f"embedding shards under {path} hold no rows")
    yield from store.iter_batches(path, batch_size=batch_size, files=src.files)


def format_result(res: SearchResult | list[dict[str, Any]], fmt: str) -> str:
    """``table`` (rank, key, score, shard, caption when known; a query column when there are several), ``json``
    or ``jsonl``. Takes a SearchResult or its (annotated) ``records()``."""
    recs = res.records() if isinstance(res, SearchResult) else res
    if fmt == "json":
        return json.dumps(recs, indent=2)
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in recs)
    if fmt != "table":
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    many = len(recs) > 1
    asked = Counter(str(r["query"]) for r in recs)  # a key several shards hold: one row per shard, named by it
    name = (lambda r: f"{r['query']} ({short_shard(r['query_shard'])})"  # noqa: E731
            if asked[str(r["query"])] > 1 and r.get("query_shard") else str(r["query"]))
    captions = any("caption" in h for r in recs for h in r["results"])
    head = (["query"] if many else []) + ["rank", "key", "score", "shard"] + (["caption"] if captions else [])
    rows = [([name(r)] if many else []) + [str(h["rank"]), h["key"] + (" (self)" if h.get("self") else ""),
                                                   f"{h['score']:.4f}", h["shard"]]
            + ([_short(h.get("caption", ""))] if captions else [])
            for r in recs for h in r["results"]]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def classify(query: str) -> str:
    """What a positional QUERY is: an existing Parquet file (vectors), folder (embeddings), image, else a key."""
    p = Path(query)
    if p.is_dir():
        return "embeddings"
    if p.is_file() and p.suffix == ".parquet":
        return "vectors"
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "key"


def run_search(index_dir: str | Path, query: str | None = None, keys: Sequence[str] = (), images: Sequence[str] = (),
               vectors: str | None = None, embeddings: str | None = None, k: int = 10, fmt: str = "table",
               include_self: bool = False, params: dict[str, int] | None = None,
               embeddings_source: str | None = None, html: str | None = None,
               key_shard: str | None = None, texts: Sequence[str] = (),
               texts_from: str | None = None) -> Iterator[str]:
    """Entry point of ``embedpipe search``: yields output chunks (one per query batch), then a summary line.

    With ``html``, also writes a page with each query image and its neighbours' thumbnails (read from the shards).

    The last item yielded is the summary (the CLI prints it on stderr so stdout stays machine-readable).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    keys, images, texts = list(keys), list(images), list(texts)
    if any(not t.strip() for t in texts):
        raise UserError("--text takes a non-empty query, e.g. --text 'a red car'")
    if texts_from is not None:
        texts += read_texts(texts_from, "--texts-file", none="")
    if query is not None:
        kind = classify(query)
        if kind == "key":
            keys.append(query)
        elif kind == "image":
            images.append(query)
        elif kind == "vectors":
            vectors = vectors or query
        else:
            embeddings = embeddings or query
    given = sum(map(bool, (keys, images, texts, vectors, embeddings)))
    if given != 1:
        raise UserError("give exactly one kind of query: a KEY (or --key), --image FILE, --text TEXT (or --texts-file), "
                        "--vectors FILE.parquet or --embeddings EMB_DIR")
    if key_shard is not None and not keys:
        raise UserError("--key-shard picks the shard of a --key query; give the key too")
    if html and not (keys or images or texts):
        raise UserError("--html shows the queries and their neighbours: use it with --key, --image or --text queries")
    idx = open_index(index_dir, embeddings_source)
    if params:
        idx.set_params(params)
    n = 0
    if keys:
        res = idx.search_keys(keys, k, include_self, shards=key_shard)
        records = idx.annotate(res.records())
        n = len(records)
        if html:
            from .html_page import render

            qids = idx.known_ids(res.queries, res.query_shards)
            render(records, html, query_info={(r["query"], r["query_shard"]): info
                                              for r, info in zip(records, idx.describe(qids))})
        yield format_result(records, fmt)
    elif texts:
        records = idx.annotate(idx.search_texts(texts, k).records())
        n = len(texts)
        if html:
            from .html_page import render

            render(records, html, query_texts=set(texts))
        yield format_result(records, fmt)
    elif vectors:
        x, qkeys, qmeta = vectors_file(vectors)
        idx.check_model(qmeta.identity if qmeta else None, f"--vectors {vectors}", "query with the index's model")
        res = idx.search(like_the_index(idx, x, vectors), k, queries=qkeys, where=f"--vectors {vectors}")
        n = len(x)
        yield format_result(idx.annotate(res.records()), fmt)
    elif images:
        records = idx.annotate(idx.search_images(images, k).records())
        n = len(images)
        if html:
            from .html_page import render

            render(records, html, query_images={p: p for p in images})
        yield format_result(records, fmt)
    else:
        src = store.scan(embeddings)
        idx.check_model(src.meta.identity if src.meta else None, str(src.files[0]), "query with the index's model")
        records = []  # --format json is one document; table and jsonl stream per batch
        for batch in embeddings_batches(embeddings):
            res = idx.search(batch.embeddings, k, queries=batch.keys, exclude_ids=idx.known_ids(batch.keys, batch.shards),
                             include_self=include_self, where=str(batch.source))
            n += len(batch.keys)
            if fmt == "json":
                records.extend(idx.annotate(res.records()))
            else:
                yield format_result(idx.annotate(res.records()), fmt)
        if fmt == "json":
            yield json.dumps(records, indent=2)
    p = ", ".join(f"{a}={b}" for a, b in params.items()) if params else idx.record.params_text()
    yield f"searched {idx.path} ({idx.record.factory}, {idx.count} vectors{', ' + p if p else ''}): {n} queries, k={k}"
