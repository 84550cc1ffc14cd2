"""Query an index directory: by key, by vectors, by embedding folder or by image; results carry keys; output formats.

Example (from a service):
    >>> idx = open_index("runs/a/index")  # doctest: +SKIP
    >>> res = idx.search_keys(["000123"], k=5)  # doctest: +SKIP
    >>> res.records()[0]["results"][0]["key"]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import index as ix
from . import index_tune as tune
from . import store
from .errors import UserError

log = logging.getLogger(__name__)
FORMATS = ("table", "json", "jsonl")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SearchResult:
    """k nearest neighbours of each query: ids/scores [n, k] (id -1 where fewer than k were found)."""

    ids: np.ndarray
    scores: np.ndarray
    keys: list[list[str]]
    shards: list[list[str]]
    indices: list[list[int]]
    queries: list[str | None]
    is_self: np.ndarray  # bool [n, k]: the hit is the query item itself (only with include_self)

    def records(self) -> list[dict[str, Any]]:
        """One dict per query: ``{"query": ..., "results": [{"rank", "key", "score", "shard", "index", "id"}]}``."""
        out = []
        for q in range(len(self.ids)):
            hits = []
            for r in range(self.ids.shape[1]):
                if self.ids[q, r] < 0:
                    continue
                hit = {"rank": len(hits) + 1, "key": self.keys[q][r], "score": round(float(self.scores[q, r]), 6),
                       "shard": self.shards[q][r], "index": self.indices[q][r], "id": int(self.ids[q, r])}
                if self.is_self[q, r]:
                    hit["self"] = True
                hits.append(hit)
            out.append({"query": self.queries[q], "results": hits})
        return out


class Index:
    """An opened index directory: the FAISS index with its tuned parameters and the id → key table."""

    def __init__(self, path: str | Path, embeddings: str | Path | None = None, mmap: bool = False):
        self.path = Path(path)
        self.meta = ix.read_meta(self.path)
        self.index = ix.load_faiss(self.path, self.meta, mmap=mmap)
        tune.set_params(self.index, self.meta.get("search_params", {}))
        self.ids = pq.read_table(self.path / ix.IDS_FILE)
        if len(self.ids) != self.index.ntotal:
            raise UserError(f"{self.path / ix.IDS_FILE} has {len(self.ids)} rows but the index holds "
                            f"{self.index.ntotal} vectors; the directory is damaged: rebuild it")
        self.embeddings = Path(embeddings) if embeddings else Path(self.meta.get("source", ""))
        self._key_col = self.ids.column("key").combine_chunks()

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def set_params(self, params: dict[str, int]) -> None:
        """Override search parameters (``nprobe``, ``efSearch``, ``k_factor_rf``) for later searches."""
        tune.set_params(self.index, params)

    def check_vectors(self, vectors: np.ndarray, where: str) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.dim:
            got = v.shape[1] if v.ndim == 2 else v.shape
            raise UserError(f"{where} has dimension {got} but the index {self.path} holds dimension {self.dim}; "
                            f"query with embeddings from the index's model ({self.meta['embedding_meta'].get('model', '?')})")
        return np.ascontiguousarray(v)

    def search(self, vectors: np.ndarray, k: int = 10, queries: Sequence[str | None] | None = None,
               exclude_ids: np.ndarray | None = None, include_self: bool = False, where: str = "query") -> SearchResult:
        """k-NN of each row of ``vectors`` [n, D] (float16/32); ``exclude_ids`` [n] drops (or flags) the query item."""
        if k < 1:
            raise UserError(f"-k {k} must be at least 1")
        x = self.check_vectors(vectors, where)
        extra = 1 if exclude_ids is not None else 0
        scores, ids = self.index.search(x, min(k + extra, max(self.count, 1)))
        if exclude_ids is None:
            is_self = np.zeros(ids.shape, bool)
        else:
            is_self = (ids == np.asarray(exclude_ids, np.int64)[:, None]) & (ids >= 0)
            if not include_self:
                keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self hits first, order kept
                ids, scores = np.take_along_axis(ids, keep, 1), np.take_along_axis(scores, keep, 1)
                is_self = np.zeros(ids.shape, bool)
            else:
                ids, scores, is_self = ids[:, :k], scores[:, :k], is_self[:, :k]
        return self._result(ids, scores, list(queries) if queries is not None else [None] * len(ids), is_self)

    def _result(self, ids: np.ndarray, scores: np.ndarray, queries: list[str | None], is_self: np.ndarray
                ) -> SearchResult:
        flat = np.maximum(ids.reshape(-1), 0)
        rows = self.ids.take(pa.array(flat))
        keys, shards, idx = (rows.column(c).to_pylist() for c in ("key", "shard", "index"))
        w = ids.shape[1] if ids.ndim == 2 else 0
        split = (lambda xs: [xs[i * w:(i + 1) * w] for i in range(len(ids))])
        return SearchResult(ids, scores, split(keys), split(shards), split(idx), queries, is_self)

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """FAISS ids of ``keys``; unknown keys are an error that names them."""
        pos = pc.index_in(pa.array(list(keys), pa.string()), value_set=self._key_col).to_numpy(zero_copy_only=False)
        missing = [k for k, p in zip(keys, pos) if np.isnan(p)] if pos.dtype.kind == "f" else []
        if missing:
            raise UserError(f"{len(missing)} key(s) not in the index {self.path}: {missing[:5]}; check the spelling "
                            f"(keys are listed in {self.path / ix.IDS_FILE}) or --update the index with their shard")
        ids = self.ids.column("id").to_numpy()
        return ids[pos.astype(np.int64)]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored embeddings of ``ids``: read from the embedding shards, else reconstructed by FAISS."""
        ids = np.asarray(ids, np.int64)
        rows = self.ids.take(pa.array(ids))
        files, offs = rows.column("file").to_pylist(), rows.column("row").to_numpy()
        out = np.zeros((len(ids), self.dim), np.float32)
        if all((self.embeddings / f).is_file() or (self.embeddings / store.EMBEDDINGS / f).is_file() for f in set(files)):
            base = store.embeddings_dir(self.embeddings)
            for f in set(files):
                sel = [i for i, g in enumerate(files) if g == f]
                col = pq.read_table(base / f, columns=["embedding"]).column("embedding").take(pa.array(offs[sel]))
                out[sel] = store.embedding_matrix(col)
            return out
        return self._reconstruct(ids)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        try:
            if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
            return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim))
        except RuntimeError:
            raise UserError(f"the embedding folder {self.embeddings} is gone and {self.meta['factory']} cannot return "
                            "stored vectors; pass the embedding folder (--embeddings-source DIR / open_index(path, "
                            "embeddings=DIR))") from None

    def search_keys(self, keys: Sequence[str], k: int = 10, include_self: bool = False) -> SearchResult:
        """k-NN of items already in the index, by key; each query item is excluded (or flagged with include_self)."""
        ids = self.lookup(keys)
        return self.search(self.vectors(ids), k, queries=list(keys), exclude_ids=ids, include_self=include_self,
                           where="stored vectors")

    def known_ids(self, keys: Sequence[str]) -> np.ndarray:
        """ids of ``keys`` where indexed, -1 elsewhere (for excluding self-matches of external batches)."""
        pos = pc.index_in(pa.array(list(keys), pa.string()), value_set=self._key_col)
        filled = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = self.ids.column("id").to_numpy()
        return np.where(filled >= 0, ids[np.maximum(filled, 0)], -1)


def open_index(path: str | Path, embeddings: str | Path | None = None, mmap: bool = False) -> Index:
    """Open an index directory written by ``embedpipe index`` (tuned search parameters applied).

    Args:
        path: the index directory (holding index.json, index.faiss, ids.parquet).
        embeddings: the embedding folder, when it moved since indexing (used to fetch vectors for search_keys).
        mmap: memory-map the index file instead of loading it (for IVF indexes larger than RAM).
    """
    return Index(path, embeddings, mmap)


# ---------------------------------------------------------------- query sources for the CLI


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


def embeddings_batches(path: str | Path, batch_size: int = 4096) -> Iterator[store.Batch]:
    """Batches of a whole embedding folder, as queries (dims/dtypes/models checked like for indexing)."""
    src = ix.scan(path)
    if src.rows == 0:
        raise UserError(f"embedding shards under {path} hold no rows")
    yield from store.iter_batches(path, batch_size=batch_size, files=src.files)


def embed_image_files(paths: Sequence[str], meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed images with the backbone and preprocessing recorded in the index's embedding metadata."""
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"--image {p} does not exist")
    if not meta.get("model"):
        raise UserError("this index records no embedding model (embedding_meta.model), so --image cannot embed "
                        "like it; embed the images with `embedpipe embed` and query with --vectors/--embeddings")
    try:
        from .embed import embed_images
    except ImportError:
        raise UserError("--image needs pipeline.embed.embed_images, which this installation lacks; embed the images "
                        "with `embedpipe embed` and query with --embeddings") from None
    out = embed_images(list(paths), meta)
    vectors, reported = (out if isinstance(out, tuple) else (out, {}))
    return np.asarray(vectors, np.float32), dict(reported or {})


def format_result(res: SearchResult, fmt: str) -> str:
    """``table`` (rank, key, score, shard; a query column when there are several), ``json`` or ``jsonl``."""
    recs = res.records()
    if fmt == "json":
        return json.dumps(recs, indent=2)
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in recs)
    if fmt != "table":
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    many = len(recs) > 1
    head = (["query"] if many else []) + ["rank", "key", "score", "shard"]
    rows = [([str(r["query"])] if many else []) + [str(h["rank"]), h["key"] + (" (self)" if h.get("self") else ""),
                                                   f"{h['score']:.4f}", h["shard"]]
            for r in recs for h in r["results"]]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


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
               embeddings_source: str | None = None, html: str | None = None) -> Iterator[str]:
    """Entry point of ``embedpipe search``: yields output chunks (one per query batch), then a summary line.

    With ``html``, also writes a page with each query image and its neighbours' thumbnails (read from the shards).

    The last item yielded is the summary (the CLI prints it on stderr so stdout stays machine-readable).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    keys, images = list(keys), list(images)
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
    given = sum(map(bool, (keys, images, vectors, embeddings)))
    if given != 1:
        raise UserError("give exactly one kind of query: a KEY (or --key), --image FILE, --vectors FILE.parquet or "
                        "--embeddings EMB_DIR")
    if html and not (keys or images):
        raise UserError("--html shows query images: use it with --key or --image queries")
    idx = open_index(index_dir, embeddings_source)
    if params:
        idx.set_params(params)
    model = ix.model_of(idx.meta.get("embedding_meta", {}))
    n = 0
    if keys:
        res = idx.search_keys(keys, k, include_self)
        n = len(keys)
        if html:
            from .html_report import render

            shard_col = idx.ids.column("shard").to_pylist()
            id_col = idx.ids.column("id").to_numpy()
            row_of = {int(i): r for r, i in enumerate(id_col)}
            render(res.records(), html, query_shards={q: shard_col[row_of[int(i)]] for q, i in zip(keys, idx.lookup(keys))})
        yield format_result(res, fmt)
    elif vectors:
        x, qkeys, qmeta = vectors_file(vectors)
        ix.check_same_model(model, ix.model_of(qmeta), f"--vectors {vectors}", "query with the index's model")
        res = idx.search(x, k, queries=qkeys, where=f"--vectors {vectors}")
        n = len(x)
        yield format_result(res, fmt)
    elif images:
        x, reported = embed_image_files(images, idx.meta.get("embedding_meta", {}))
        ix.check_same_model(model, ix.model_of(reported), f"--image {images[0]}",
                            "embed the query with the model the index was built from, or rebuild the index")
        res = idx.search(x, k, queries=images, where=f"the embedding of --image {images[0]}")
        n = len(images)
        if html:
            from .html_report import render

            render(res.records(), html, query_images={p: p for p in images})
        yield format_result(res, fmt)
    else:
        src = ix.scan(embeddings)
        ix.check_same_model(model, ix.model_of(src.meta), str(src.files[0]), "query with the index's model")
        records: list[dict[str, Any]] = []  # --format json is one document; table and jsonl stream per batch
        for batch in embeddings_batches(embeddings):
            res = idx.search(batch.embeddings, k, queries=batch.keys, exclude_ids=idx.known_ids(batch.keys),
                             include_self=include_self, where=str(batch.source))
            n += len(batch.keys)
            if fmt == "json":
                records.extend(res.records())
            else:
                yield format_result(res, fmt)
        if fmt == "json":
            yield json.dumps(records, indent=2)
    p = ", ".join(f"{a}={b}" for a, b in (params or idx.meta.get("search_params", {})).items())
    yield f"searched {idx.path} ({idx.meta['factory']}, {idx.count} vectors{', ' + p if p else ''}): {n} queries, k={k}"

