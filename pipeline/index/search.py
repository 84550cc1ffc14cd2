"""An opened index: nearest neighbours by vectors, stored keys, images or texts, with keys and shards in the results.

Example:
    >>> idx = open_index("runs/a/index")  # doctest: +SKIP
    >>> idx.search_keys(["000123"], k=5).records()[0]["results"][0]["key"]  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import store
from ..captions import caption_and_url
from ..errors import UserError
from . import tune
from ..records import ModelIdentity
from .columns import FileCache, Strings, codes, read_column, read_vectors
from .keys import KeyRows, KeyTable, short_shard
from .layout import IDS_FILE, INDEX_FILE, check_ids, load_faiss, read_record
from .record import IndexRecord

log = logging.getLogger(__name__)


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
    query_shards: list[str] | None = None  # key queries: the shard of each query row (a row is (shard, key))

    def __repr__(self) -> str:
        found = int((self.ids >= 0).sum())
        first = next((f"{q!r} -> {row[0]!r}" for q, row, i in zip(self.queries, self.keys, self.ids) if len(i) and i[0] >= 0),
                     "no hits")
        return f"SearchResult({len(self.ids)} queries, {found} hits; {first})"

    def records(self) -> list[dict[str, Any]]:
        """One dict per query: ``{"query": ..., "results": [{"rank", "key", "score", "shard", "index", "id"}]}``
        (and ``"query_shard"`` for a key query: a key several shards hold is answered for each)."""
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
            rec: dict[str, Any] = {"query": self.queries[q]}
            if self.query_shards is not None:
                rec["query_shard"] = self.query_shards[q]
            rec["results"] = hits
            out.append(rec)
        return out


class Index:
    """An opened index directory: the FAISS index with its tuned parameters and the id → key table."""

    def __init__(self, path: str | Path, embeddings: str | Path | None = None, mmap: bool = False):
        self.path = Path(path)
        self.record: IndexRecord = read_record(self.path)
        self.index = load_faiss(self.path, self.record, mmap=mmap)
        if self.index.d != self.record.dim:
            raise UserError(f"{self.path / INDEX_FILE} holds vectors of dimension {self.index.d} but index.json says "
                            f"{self.record.dim}; the directory is damaged: rebuild it")
        tune.set_params(self.index, dict(self.record.search_params))
        self.ids = pq.read_table(self.path / IDS_FILE)
        check_ids(self.ids, self.path / IDS_FILE)
        if len(self.ids) != self.index.ntotal:
            raise UserError(f"{self.path / IDS_FILE} has {len(self.ids)} rows but the index holds "
                            f"{self.index.ntotal} vectors; the directory is damaged: rebuild it")
        self.embeddings = Path(embeddings) if embeddings else Path(self.record.source)
        # Columns combined once: a take on the chunked table cost more than FAISS's own search. Keys are read back
        # from one buffer by offsets (no Python object per row, no Arrow call per search); shards and files repeat,
        # so they are held as codes into small lists of names.
        self._key_col = self.ids.column("key").combine_chunks()
        self._keys = Strings(self._key_col)
        self._id_col = self.ids.column("id").to_numpy()
        self._index_col = self.ids.column("index").to_numpy()
        self._row_col = self.ids.column("row").to_numpy()
        self._shard_codes, self._shard_names = codes(self.ids.column("shard"))
        self._file_codes, self._file_names = codes(self.ids.column("file"))
        self._key_table = KeyTable(self._key_col, self._shard_codes, self._shard_names)
        self._vector_cache: FileCache | None = None
        self._base: Path | None = None
        self._text: Any = None  # the TextEmbedder of the index's model, built on the first text query

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}: {self.record.factory}, {self.count} vectors of dim {self.dim}, "
                f"model {self.record.model or '?'}, recall@10 {self.record.recall_at_10})")

    @property
    def meta(self) -> dict[str, Any]:
        """``index.json`` as a plain dict (for printing or storing; code reads :attr:`record`)."""
        return self.record.to_dict()

    @property
    def model(self) -> ModelIdentity | None:
        """The identity of the model whose embeddings the index holds (None: the embeddings recorded none)."""
        return self.record.embedding_meta.identity if self.record.embedding_meta else None

    def check_model(self, other: ModelIdentity | None, where: str, fix: str) -> None:
        """Refuse query vectors of another model than the index's (unknown on either side: not refused)."""
        if self.model is not None and other is not None:
            self.model.check_same(other, where, fix)

    @property
    def dim(self) -> int:
        return self.record.dim

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
                            f"query with embeddings from the index's model ({self.record.model or '?'})")
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
                ids = np.where(np.take_along_axis(is_self, keep, 1), -1, ids)  # k >= count: self still there
                is_self = np.zeros(ids.shape, bool)
            else:
                ids, scores, is_self = ids[:, :k], scores[:, :k], is_self[:, :k]
        return self._result(ids, scores, list(queries) if queries is not None else [None] * len(ids), is_self)

    def _result(self, ids: np.ndarray, scores: np.ndarray, queries: list[str | None], is_self: np.ndarray
                ) -> SearchResult:
        flat = ids.ravel()  # -1 (no hit) picks the last row as a filler; records() skips it
        keys = self._keys.take(flat)
        shards = self._shard_names[self._shard_codes[flat]].tolist()
        idx = self._index_col[flat].tolist()
        w = ids.shape[1] if ids.ndim == 2 else 0
        split = (lambda xs: [xs[i * w:(i + 1) * w] for i in range(len(ids))])
        return SearchResult(ids, scores, split(keys), split(shards), split(idx), queries, is_self)

    def find_keys(self, keys: Sequence[str], shards: Sequence[str | None] | str | None = None) -> list[KeyRows]:
        """Every row each key names (one per shard holding it), within the shard each selector names (a url, a
        trailing part of its path, or a file name; one string applies to every key). A key without rows is an
        error that names it."""
        sel = [shards] * len(keys) if isinstance(shards, str) else shards
        found = self._key_table.find(list(keys), sel)
        missing = [r for r in found if not len(r.ids)]
        if missing:
            named = [r.key for r in missing if r.selector is not None and self._key_table.rows_of([r.key])]
            if named:
                r = next(r for r in missing if r.key == named[0])
                where = sorted({self._key_table.shard_of(i) for i in self._key_table.rows_of([r.key])[r.key]})
                raise UserError(f"key {r.key!r} is not in a shard matching {r.selector!r} of the index {self.path}; "
                                f"it is in {where[:5]}")
            keys_missing = [r.key for r in missing]
            raise UserError(f"{len(keys_missing)} key(s) not in the index {self.path}: {keys_missing[:5]}; check the "
                            f"spelling (keys are listed in {self.path / IDS_FILE}) or --update the index with their "
                            "shard")
        return found

    def key_is_shared(self, key: str) -> bool:
        """Several rows (of different shards) hold ``key``: naming one takes its shard too."""
        return self._key_table.is_shared(key)

    def lookup(self, keys: Sequence[str], shards: Sequence[str | None] | str | None = None) -> np.ndarray:
        """The FAISS id of each key: unknown keys, and keys that several shards hold (without a selector that
        picks one), are errors that say which and how to pick."""
        ids = []
        for r in self.find_keys(keys, shards):
            if len(r.ids) > 1:
                raise UserError(f"key {r.key!r} is ambiguous: {len(r.ids)} shards of the index {self.path} hold it "
                                f"({', '.join(r.shards[:3])}); pick one with --key-shard SHARD (its url, the end of "
                                f"its path such as {short_shard(r.shards[0])!r}, or its file name)")
            ids.append(int(r.ids[0]))
        return np.array(ids, np.int64)

    def cache_lookups(self, vector_bytes: int = 0) -> None:
        """Hold a key → id table (and up to ``vector_bytes`` of stored columns) in memory for many later lookups.

        A one-off lookup hashes the key column anew (fine for one CLI query); a service answering key queries
        builds the table once (about 100 bytes a key) and keeps the columns of recently used embedding files
        (embeddings, captions) decoded.

        Example:
            >>> idx = open_index("runs/a/index"); idx.cache_lookups(vector_bytes=1 << 30)  # doctest: +SKIP
        """
        self._key_table = KeyTable(self._key_col, self._shard_codes, self._shard_names, cached=True)
        self._vector_cache = FileCache(vector_bytes) if vector_bytes > 0 else None

    def warm_cache(self) -> int:
        """Read the stored vectors of embedding files into the :meth:`cache_lookups` cache while they fit, so that
        a service's first key queries do not each wait for a file read (a service calls this in the background).
        Returns how many files were read."""
        cache = self._vector_cache
        if cache is None or not len(self._file_codes):
            return 0
        used, first_ids = np.unique(self._file_codes, return_index=True)
        read = 0
        for code, first in zip(used.tolist(), first_ids.tolist()):
            if (str(self._file_names[code]), "embedding") in cache:
                continue
            if read and cache.bytes + cache.bytes / read > cache.max_bytes:  # the next file would not fit
                break
            self.vectors(np.array([first], np.int64))
            read += 1
        return read

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored embeddings of ``ids``: read from the embedding shards, else reconstructed by FAISS."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        groups = self._by_file(ids)
        cache = self._vector_cache
        if all((cache is not None and (f, "embedding") in cache) or (self.embeddings / f).is_file()
               or (self.embeddings / store.EMBEDDINGS / f).is_file() for f, _, _ in groups):
            base = self._embeddings_dir()
            for f, sel, rows in groups:
                if cache is not None:
                    out[sel] = cache.get((f, "embedding"), partial(read_vectors, base / f))[rows]
                else:
                    out[sel] = read_vectors(base / f, rows)
            return out
        return self._reconstruct(ids)

    def stored(self, ids: np.ndarray, columns: Sequence[str]) -> dict[str, list[Any]]:
        """Values of columns the embedding files keep (``txt``, ``json``, ``label``) for ``ids``, by column; None
        where a file lacks the column or is gone."""
        ids = np.asarray(ids, np.int64)
        out: dict[str, list[Any]] = {c: [None] * len(ids) for c in columns}
        if not self.embeddings.exists():
            return out
        base = self._embeddings_dir()
        for f, sel, rows in self._by_file(ids):
            for c in columns:
                if self._vector_cache is not None:
                    col = self._vector_cache.get((f, c), partial(read_column, base / f, c))
                else:
                    col = read_column(base / f, c)
                if col is not None:
                    for i, v in zip(sel.tolist(), col.take(pa.array(rows)).to_pylist()):
                        out[c][i] = v
        return out

    def describe(self, ids: np.ndarray) -> list[dict[str, str]]:
        """Caption and source url of each id, where the embedding files kept ``txt``/``json`` (img2dataset's)."""
        kept = self.stored(ids, ("txt", "json"))
        return [caption_and_url(t, j) for t, j in zip(kept["txt"], kept["json"])]

    def annotate(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add ``caption``/``url`` to each hit of ``SearchResult.records()`` that has them (in place)."""
        hits = [h for r in records for h in r["results"]]
        if hits:
            for h, extra in zip(hits, self.describe(np.array([h["id"] for h in hits], np.int64))):
                h.update(extra)
        return records

    def _embeddings_dir(self) -> Path:
        if self._vector_cache is None:
            return store.embeddings_dir(self.embeddings)
        if self._base is None:  # looked up once when many lookups follow
            self._base = store.embeddings_dir(self.embeddings)
        return self._base

    def _by_file(self, ids: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(embedding file name, positions in ``ids``, rows in that file) for each file that ``ids`` come from."""
        at: dict[int, list[int]] = {}  # a dict, not np.unique: a service's few ids at a time cost microseconds
        for pos, code in enumerate(self._file_codes[ids].tolist()):
            at.setdefault(code, []).append(pos)
        return [(str(self._file_names[code]), sel, self._row_col[ids[sel]])
                for code, sel in ((code, np.array(pos, np.int64)) for code, pos in at.items())]

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        try:
            if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
            return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim))
        except RuntimeError:
            raise UserError(f"the embedding folder {self.embeddings} is gone and {self.record.factory} cannot return "
                            "stored vectors; pass the embedding folder (--embeddings-source DIR / open_index(path, "
                            "embeddings=DIR))") from None

    def search_keys(self, keys: Sequence[str], k: int = 10, include_self: bool = False,
                    shards: Sequence[str | None] | str | None = None) -> SearchResult:
        """k-NN of items already in the index, by key; each query item is excluded (or flagged with include_self).

        A row is its (shard, key): a key that several shards hold is answered for each of them (one result per
        row, its ``query_shard`` saying which); ``shards`` (see :meth:`find_keys`) picks among them."""
        rows = self.find_keys(keys, shards)
        for r in rows:
            if len(r.ids) > 1 and r.selector is None:
                log.info("key %r is in %d shards (%s); answered for each: pick one with --key-shard SHARD", r.key,
                         len(r.ids), ", ".join(map(short_shard, r.shards[:3])))
        ids = np.concatenate([r.ids for r in rows]) if rows else np.zeros(0, np.int64)
        res = self.search(self.vectors(ids), k, queries=[r.key for r in rows for _ in r.ids], exclude_ids=ids,
                          include_self=include_self, where="stored vectors")
        res.query_shards = [s for r in rows for s in r.shards]
        return res

    def search_images(self, paths: Sequence[str | Path], k: int = 10) -> SearchResult:
        """k-NN of image files, embedded with the backbone and preprocessing recorded in the index."""
        meta = self.record.embedding_meta
        for p in paths:
            if not Path(p).is_file():
                raise UserError(f"image {p} does not exist")
        if meta is None:
            raise UserError("this index records no embedding model (embedding_meta.model), so images cannot be embedded "
                            "like its vectors; embed them with `embedpipe embed` and query with their vectors")
        from ..model.rebuild import embed_images

        x, used = embed_images([str(p) for p in paths], meta)
        self.check_model(used, f"image {paths[0]}",
                         "embed the query with the model the index was built from, or rebuild the index")
        return self.search(x, k, queries=[str(p) for p in paths], where=f"the embedding of image {paths[0]}")

    def search_texts(self, texts: Sequence[str], k: int = 10) -> SearchResult:
        """k-NN of text queries, embedded with the text tower of the image-text model the index's embeddings
        record (built on the first text query, then kept); a model without one is a UserError naming it.

        Example:
            >>> open_index("runs/clip/index").search_texts(["a red car"], k=5).keys[0]  # doctest: +SKIP
        """
        texts = list(texts)
        if not texts:
            raise UserError("give at least one text query")
        x = self.text_embedder().embed_texts(texts)
        return self.search(x, k, queries=texts, where="the text embedding")

    def text_embedder(self) -> Any:
        """The :class:`~pipeline.model.rebuild.TextEmbedder` of the index's model (built once)."""
        meta = self.record.embedding_meta
        if meta is None:
            raise UserError("this index records no embedding model (embedding_meta.model), so texts cannot be "
                            "embedded like its vectors; query it with keys or vectors")
        if self._text is None:
            from ..model.rebuild import TextEmbedder

            self._text = TextEmbedder(meta)
        return self._text

    def known_ids(self, keys: Sequence[str], shards: Sequence[str] | None = None) -> np.ndarray:
        """ids of ``keys`` (of each (key, shard url) when ``shards`` are given) where indexed, -1 elsewhere and
        for a key several shards hold (for excluding self-matches of external batches)."""
        if shards is not None:
            return self._key_table.ids_of_pairs(list(keys), list(shards))
        return self._key_table.unique_ids(list(keys))


def open_index(path: str | Path, embeddings: str | Path | None = None, mmap: bool = False) -> Index:
    """Open an index directory written by ``embedpipe index`` (tuned search parameters applied).

    Args:
        path: the index directory (holding index.json, index.faiss, ids.parquet).
        embeddings: the embedding folder, when it moved since indexing (used to fetch vectors for search_keys).
        mmap: memory-map the index file instead of loading it (for IVF indexes larger than RAM).
    """
    return Index(path, embeddings, mmap)
