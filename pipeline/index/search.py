"""An opened index: nearest neighbours by vectors, by stored keys or by images, with keys and shards in the results.

Example:
    >>> idx = open_index("runs/a/index")  # doctest: +SKIP
    >>> idx.search_keys(["000123"], k=5).records()[0]["results"][0]["key"]  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import store
from ..captions import caption_and_url
from ..errors import UserError
from . import tune
from ..records import ModelIdentity
from .layout import IDS_FILE, load_faiss, read_record
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

    def __repr__(self) -> str:
        found = int((self.ids >= 0).sum())
        first = next((f"{q!r} -> {row[0]!r}" for q, row, i in zip(self.queries, self.keys, self.ids) if len(i) and i[0] >= 0),
                     "no hits")
        return f"SearchResult({len(self.ids)} queries, {found} hits; {first})"

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
        self.record: IndexRecord = read_record(self.path)
        self.index = load_faiss(self.path, self.record, mmap=mmap)
        tune.set_params(self.index, dict(self.record.search_params))
        self.ids = pq.read_table(self.path / IDS_FILE)
        if len(self.ids) != self.index.ntotal:
            raise UserError(f"{self.path / IDS_FILE} has {len(self.ids)} rows but the index holds "
                            f"{self.index.ntotal} vectors; the directory is damaged: rebuild it")
        self.embeddings = Path(embeddings) if embeddings else Path(self.record.source)
        # Columns combined once: a take on the chunked table cost more than FAISS's own search. Keys are read back
        # from one buffer by offsets (no Python object per row, no Arrow call per search); shards and files repeat,
        # so they are held as codes into small lists of names.
        self._key_col = self.ids.column("key").combine_chunks()
        self._keys = _Strings(self._key_col)
        self._id_col = self.ids.column("id").to_numpy()
        self._index_col = self.ids.column("index").to_numpy()
        self._row_col = self.ids.column("row").to_numpy()
        self._shard_codes, self._shard_names = _codes(self.ids.column("shard"))
        self._file_codes, self._file_names = _codes(self.ids.column("file"))
        self._key_ids: dict[str, int] | None = None
        self._vector_cache: _FileCache | None = None
        self._base: Path | None = None

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

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """FAISS ids of ``keys``; unknown keys are an error that names them."""
        ids = self.known_ids(keys)
        missing = [k for k, i in zip(keys, ids) if i < 0]
        if missing:
            raise UserError(f"{len(missing)} key(s) not in the index {self.path}: {missing[:5]}; check the spelling "
                            f"(keys are listed in {self.path / IDS_FILE}) or --update the index with their shard")
        return ids

    def cache_lookups(self, vector_bytes: int = 0) -> None:
        """Hold a key → id table (and up to ``vector_bytes`` of stored columns) in memory for many later lookups.

        A one-off lookup hashes the key column anew (fine for one CLI query); a service answering key queries
        builds the table once (about 100 bytes a key) and keeps the columns of recently used embedding files
        (embeddings, captions) decoded.

        Example:
            >>> idx = open_index("runs/a/index"); idx.cache_lookups(vector_bytes=1 << 30)  # doctest: +SKIP
        """
        self._key_ids = dict(zip(self._key_col.to_pylist(), self._id_col.tolist()))
        self._vector_cache = _FileCache(vector_bytes) if vector_bytes > 0 else None

    def warm_cache(self) -> int:
        """Read the stored vectors of embedding files into the :meth:`cache_lookups` cache while they fit, so that
        a service's first key queries do not each wait for a file read (a service calls this in the background).
        Returns how many files were read."""
        cache = self._vector_cache
        if cache is None or not len(self._file_codes):
            return 0
        codes, first_ids = np.unique(self._file_codes, return_index=True)
        read = 0
        for code, first in zip(codes.tolist(), first_ids.tolist()):
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
                    out[sel] = cache.get((f, "embedding"), partial(_read_vectors, base / f))[rows]
                else:
                    out[sel] = _read_vectors(base / f, rows)
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
                    col = self._vector_cache.get((f, c), partial(_read_column, base / f, c))
                else:
                    col = _read_column(base / f, c)
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

    def search_keys(self, keys: Sequence[str], k: int = 10, include_self: bool = False) -> SearchResult:
        """k-NN of items already in the index, by key; each query item is excluded (or flagged with include_self)."""
        ids = self.lookup(keys)
        return self.search(self.vectors(ids), k, queries=list(keys), exclude_ids=ids, include_self=include_self,
                           where="stored vectors")

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

    def known_ids(self, keys: Sequence[str]) -> np.ndarray:
        """ids of ``keys`` where indexed, -1 elsewhere (for excluding self-matches of external batches)."""
        if self._key_ids is not None:
            return np.array([self._key_ids.get(k, -1) for k in keys], np.int64)
        pos = pc.index_in(pa.array(list(keys), pa.string()), value_set=self._key_col)
        filled = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(filled >= 0, self._id_col[np.maximum(filled, 0)], -1)


class _Strings:
    """A string column as one bytes object and each row's (start, end) in it: ``take`` of a search's few rows is a
    slice and a decode each, with no Python object held per row and no Arrow call (whose overhead dominated)."""

    def __init__(self, column: pa.Array):
        arr = column.cast(pa.large_string())
        _, offsets, data = arr.buffers()
        o = np.frombuffer(offsets, np.int64, len(arr) + 1, arr.offset * 8)
        self.spans = np.stack([o[:-1], o[1:]], axis=1)
        self.data = data.to_pybytes() if data is not None else b""

    def take(self, rows: np.ndarray) -> list[str]:
        d = self.data
        return [d[a:b].decode() for a, b in self.spans[rows].tolist()]


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A string column as (int32 codes per row, numpy object array of the distinct values)."""
    enc = pc.dictionary_encode(column.combine_chunks())
    return enc.indices.to_numpy(zero_copy_only=False), np.array(enc.dictionary.to_pylist(), dtype=object)


def _read_vectors(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """The stored embeddings of one embedding file (only ``rows`` when given), as float32."""
    col = pq.read_table(path, columns=["embedding"]).column("embedding")
    return store.embedding_matrix(col if rows is None else col.take(pa.array(rows)))


def _read_column(path: Path, column: str) -> pa.Array | None:
    """One stored column of an embedding file; None when the file lacks it or is gone."""
    try:
        if column not in pq.read_schema(path).names:
            return None
        return pq.read_table(path, columns=[column]).column(column).combine_chunks()
    except (OSError, pa.ArrowInvalid):
        return None


class _FileCache:
    """Columns of embedding files by (file, column), least recently used dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()

    def __contains__(self, name: tuple[str, str]) -> bool:
        return name in self.items

    def get(self, name: tuple[str, str], load: Callable[[], Any]) -> Any:
        with self.lock:
            if name in self.items:
                self.items.move_to_end(name)
                return self.items[name]
        value = load()  # outside the lock: two threads may read the same file once each, none waits on another
        with self.lock:
            if name not in self.items:
                self.items[name] = value
                self.bytes += getattr(value, "nbytes", 0)
            while len(self.items) > 1 and self.bytes > self.max_bytes:
                self.bytes -= getattr(self.items.popitem(last=False)[1], "nbytes", 0)
        return value


def open_index(path: str | Path, embeddings: str | Path | None = None, mmap: bool = False) -> Index:
    """Open an index directory written by ``embedpipe index`` (tuned search parameters applied).

    Args:
        path: the index directory (holding index.json, index.faiss, ids.parquet).
        embeddings: the embedding folder, when it moved since indexing (used to fetch vectors for search_keys).
        mmap: memory-map the index file instead of loading it (for IVF indexes larger than RAM).
    """
    return Index(path, embeddings, mmap)
