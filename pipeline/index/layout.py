"""An index directory on disk: its file names, the ``index.json`` record, the id table and the parts layout.

    INDEX/index.faiss       the FAISS index (with merged.ivfdata and trained.faiss when merged from parts)
    INDEX/ids.parquet       FAISS id -> key, shard, index, file, row (row i holds id i)
    INDEX/index.json        what was built, from what, how it was tuned and how well it does (record.IndexRecord)
    INDEX.parts/            --train-only and --parts: trained.faiss, train.json, queries.npz, part-I-of-N/

A directory is built in a temporary sibling and swapped in (``atomic.staged_dir``), so it is always complete
or absent.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic, store
from ..errors import UserError
from . import text_recall
from .record import IndexRecord

log = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.parquet", "index.json"
IVFDATA, TRAINED = "merged.ivfdata", "trained.faiss"
TRAIN_JSON, QUERIES, GT, PART_JSON = "train.json", "queries.npz", "gt.npz", "part.json"
IDS_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                        ("file", pa.string()), ("row", pa.int64())])


def parts_dir(out: str | Path) -> Path:
    """Where ``--train-only`` and ``--part I`` write, next to the final index directory."""
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def part_name(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}"


def read_record(index_dir: str | Path) -> IndexRecord:
    """``index.json`` of an index directory, with a clear error when it is not one or cannot be read."""
    p = Path(index_dir)
    f = p / META_FILE
    if not f.is_file():
        old = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.is_dir() else []
        hint = f" (a swap was interrupted: rename {old[0]} to {p})" if old and not p.exists() else ""
        raise UserError(f"{p} is not an embedpipe index (no {META_FILE}){hint}; build it with `embedpipe index`")
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{f} is unreadable ({e}); rebuild the index with `embedpipe index ... --overwrite`") from None
    return IndexRecord.from_dict(raw, str(f))


CHECKED_FILES = (INDEX_FILE, IDS_FILE, IVFDATA, TRAINED)  # what index.json records the size and sha256 of


def write_record(index_dir: Path, record: IndexRecord) -> IndexRecord:
    """Write ``index.json`` (atomically) into an index directory being built, last, with the size and sha256 of
    each of its files (``verify`` checks them); returns the record as written."""
    files = {name: {"bytes": (index_dir / name).stat().st_size, "sha256": atomic.file_sha256(index_dir / name)}
             for name in CHECKED_FILES if (index_dir / name).is_file()}
    record = replace(record, files=files)
    atomic.write_json(index_dir / META_FILE, record.to_dict())
    return record


def load_faiss(index_dir: Path, record: IndexRecord, mmap: bool = False) -> Any:
    """Read the FAISS index of an index directory (on-disk inverted lists are found next to it)."""
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if record.on_disk else 0
    if mmap:
        flags |= faiss.IO_FLAG_MMAP
    return faiss.read_index(str(index_dir / INDEX_FILE), flags)


class IdsWriter:
    """Streams the id → (key, shard, index, file, row) table to Parquet."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, IDS_SCHEMA, compression="zstd")

    def copy_from(self, path: Path) -> None:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            self.writer.write_table(pf.read_row_group(i).cast(IDS_SCHEMA))

    def write(self, ids: np.ndarray, batch: store.Batch, rows: np.ndarray) -> None:
        self.writer.write_table(pa.table({
            "id": pa.array(ids, pa.int64()), "key": pa.array(batch.keys, pa.string()),
            "shard": pa.array(batch.shards, pa.string()), "index": pa.array(batch.indices, pa.int32()),
            "file": pa.array([batch.source.name] * len(ids), pa.string()), "row": pa.array(rows, pa.int64()),
        }, schema=IDS_SCHEMA))

    def close(self) -> None:
        self.writer.close()


def result(out: Path, rec: IndexRecord, added: int | None = None) -> dict[str, Any]:
    """What the CLI prints: the summary line and the key facts (``meta``: index.json as written)."""
    params = rec.params_text() or "no search parameters"
    verb = f"added {added} vectors to" if added is not None else "built"
    summary = (f"{verb} {out}: {rec.factory} ({rec.metric}), {rec.count} vectors of dim {rec.dim} "
               f"from {len(rec.shards)} shards; {params}; recall@1 {rec.recall_at_1:.3f}, recall@10 "
               f"{rec.recall_at_10:.3f} (target {rec.target_recall}), {rec.latency_ms_p50:.2f} ms/query"
               f"{text_recall.summary(rec.text_queries)}")
    return {"path": str(out), "summary": summary, "meta": rec.to_dict(), "record": rec}


def check_ids(table: pa.Table, path: Path) -> None:
    """An id table a search can use: :data:`IDS_SCHEMA`'s columns (text as string or large_string, integers of
    any width) and ids 0..n-1 in order; a UserError naming what is wrong otherwise."""
    def fix() -> str:
        return "the directory is damaged or was edited: rebuild the index with `embedpipe index ... --overwrite`"

    missing = [f.name for f in IDS_SCHEMA if f.name not in table.column_names]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} (it must hold {', '.join(IDS_SCHEMA.names)}); "
                        + fix())
    for f in IDS_SCHEMA:
        got = table.schema.field(f.name).type
        text = pa.types.is_string(f.type)
        if not (pa.types.is_string(got) or pa.types.is_large_string(got) if text else pa.types.is_integer(got)):
            raise UserError(f"{path}: column {f.name!r} holds {got}, not {'strings' if text else 'integers'}; " + fix())
    ids = table.column("id").to_numpy()
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(f"{path}: ids are not 0..{len(ids) - 1} in order (row i must hold id i); " + fix())


def check_dense(ids_path: Path, ntotal: int) -> None:
    """ids.parquet must hold ids 0..ntotal-1 in order (row i is id i): search relies on it."""
    ids = pq.read_table(ids_path, columns=["id"]).column("id").to_numpy()
    if len(ids) != ntotal or (len(ids) and not np.array_equal(ids, np.arange(ntotal))):
        raise RuntimeError(f"{ids_path}: ids are not 0..{ntotal - 1} in order ({len(ids)} rows)")


@dataclass(frozen=True, repr=False)
class IndexReport:
    """What ``build_index`` did: the index directory, its ``index.json`` record and the summary line."""

    path: Path
    record: IndexRecord
    summary: str

    @property
    def meta(self) -> dict[str, Any]:
        """``index.json`` as written (a plain dict, for callers that print or store it)."""
        return self.record.to_dict()

    @property
    def factory(self) -> str:
        return self.record.factory

    @property
    def count(self) -> int:
        return self.record.count

    @property
    def recall_at_10(self) -> float:
        return self.record.recall_at_10

    def __repr__(self) -> str:
        params = self.record.params_text()
        return (f"IndexReport({str(self.path)!r}: {self.factory}{' ' + params if params else ''}, {self.count} vectors, "
                f"recall@10 {self.recall_at_10:.3f})")
