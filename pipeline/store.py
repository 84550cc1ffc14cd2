"""The embedding Parquet format: its schema and metadata (``records.EmbeddingMeta``), reading shards back in batches."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .errors import UserError
from .records import EmbeddingMeta

EMBEDDINGS = "embeddings"  # the folder of Parquet shards inside an embed output folder
META_KEY = b"embedpipe"  # file metadata key holding the embedding run's metadata (JSON)
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
BASE_COLUMNS = ("key", "shard", "index", "label", "embedding")

def embedding_table(
    keys: Sequence[str],
    shard: str,
    indices: Sequence[int],
    labels: Sequence[int | None],
    embeddings: np.ndarray,
    dtype: str = "float16",
    extra: dict[str, Sequence[str | None]] | None = None,
    metadata: EmbeddingMeta | None = None,
) -> pa.Table:
    """One shard's table: ``key``, ``shard``, ``index`` int32, ``label`` int64, ``embedding``
    fixed_size_list<float16|float32>[D], then ``extra`` string columns; ``metadata`` goes to the file metadata."""
    if dtype not in DTYPES:
        raise UserError(f"unknown embedding dtype {dtype!r}; use one of {sorted(DTYPES)}")
    np_dtype, pa_dtype = DTYPES[dtype]
    emb = np.ascontiguousarray(embeddings, dtype=np_dtype)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {emb.shape}")
    n, dim = emb.shape
    flat = pa.array(emb.reshape(-1), type=pa_dtype)
    columns = {
        "key": pa.array(list(keys), pa.string()),
        "shard": pa.array([shard] * n, pa.string()),
        "index": pa.array(list(indices), pa.int32()),
        "label": pa.array(list(labels), pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    }
    for name, values in (extra or {}).items():
        columns[name] = pa.array(list(values), pa.string())
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata.to_dict(), sort_keys=True, default=str)})
    return table


def write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically. The embedding column skips dictionary encoding (it never repeats)."""
    with atomic.replacing(path) as tmp:
        dict_cols = [c for c in table.column_names if c != "embedding"]
        pq.write_table(table, tmp, use_dictionary=dict_cols, compression="zstd")


def embeddings_dir(path: Path | str) -> Path:
    """Accept either a run folder (holding ``embeddings/``) or the ``embeddings/`` folder itself."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"embedding folder {p} does not exist; pass the --out folder of `embedpipe embed`")
    return p / EMBEDDINGS if (p / EMBEDDINGS).is_dir() else p


def list_shards(path: Path | str) -> list[Path]:
    """Sorted Parquet embedding shards under ``path``; loud when there are none."""
    d = embeddings_dir(path)
    files = sorted(f for f in d.glob("*.parquet") if not f.name.startswith("."))
    if not files:
        raise UserError(f"no embedding shards (*.parquet) found in {d}; did `embedpipe embed` finish?")
    return files


def read_metadata(path: Path | str) -> EmbeddingMeta | None:
    """The embedpipe metadata stored in one Parquet shard (None when the file has none: written by another tool)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(META_KEY)
    return EmbeddingMeta.from_dict(json.loads(raw), f"{path}: embedding metadata") if raw else None


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    dim: int
    dtype: str
    metadata: EmbeddingMeta | None


def shard_info(path: Path) -> ShardInfo:
    """Rows, dim, dtype and metadata of one embedding shard, read from its footer."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}); rerun `embedpipe embed` to redo its shard") from None
    if "embedding" not in pf.schema_arrow.names:
        raise UserError(f"{path} has no 'embedding' column (columns: {', '.join(pf.schema_arrow.names)}): it is not "
                        f"an embedpipe embedding shard; pass the --out folder of `embedpipe embed` (img2dataset's own "
                        f".parquet files list the samples, not their embeddings)")
    field = pf.schema_arrow.field("embedding")
    if not pa.types.is_fixed_size_list(field.type):
        raise UserError(f"{path}: column 'embedding' is {field.type}, expected fixed_size_list<float>[D]")
    names = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}
    dtype = names.get(field.type.value_type)
    if dtype is None:
        raise UserError(f"{path}: embedding values are {field.type.value_type}, expected float16 or float32")
    try:
        meta = read_metadata(path)
    except ValueError as e:  # garbled embedpipe metadata (JSON) in an otherwise readable footer
        raise UserError(f"{path}: its embedpipe metadata is unreadable ({e}); rerun `embedpipe embed` to redo its "
                        "shard") from None
    return ShardInfo(path, pf.metadata.num_rows, field.type.list_size, dtype, meta)


def check_consistent(infos: Sequence[ShardInfo]) -> ShardInfo:
    """All shards must share dim and dtype; returns the first as the reference."""
    ref = infos[0]
    for info in infos[1:]:
        if info.dim != ref.dim:
            raise UserError(
                f"mixed embedding dims: {ref.path} has {ref.dim}, {info.path} has {info.dim}; "
                "embed all shards with the same model, or index them separately"
            )
        if info.dtype != ref.dtype:
            raise UserError(
                f"mixed embedding dtypes: {ref.path} is {ref.dtype}, {info.path} is {info.dtype}; "
                "re-embed with one --out-dtype"
            )
    return ref


@dataclass
class Source:
    """A set of embedding shards checked for one dim, one dtype and one model."""

    files: list[Path]
    infos: list[ShardInfo]
    dim: int
    dtype: str
    meta: EmbeddingMeta | None

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.infos)


def scan(emb_dir: str | Path, files: Sequence[Path] | None = None) -> Source:
    """List and check the shards under ``emb_dir`` (mixed dims, dtypes or models are errors)."""
    files = list(files) if files is not None else list_shards(emb_dir)
    infos = [shard_info(f) for f in files]
    ref = check_consistent(infos)
    for info in infos[1:]:
        if ref.metadata is not None and info.metadata is not None:
            ref.metadata.identity.check_same(info.metadata.identity, str(info.path),
                                             "index each model's embeddings separately", theirs=str(ref.path))
    return Source(files, infos, ref.dim, ref.dtype, ref.metadata)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as a float32 [N, D] matrix, without going through Python objects."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


@dataclass(repr=False)
class Batch:
    """Rows of embedding shards: keys, shard urls, indices within the shard, labels and float32 embeddings."""

    keys: list[str]
    shards: list[str]
    indices: np.ndarray
    labels: list[int | None]
    embeddings: np.ndarray  # float32 [N, D]
    source: Path
    extra: dict[str, list[Any]] = field(default_factory=dict)  # requested non-base columns, as Python lists

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        extra = f", extra={sorted(self.extra)}" if self.extra else ""
        return f"Batch({len(self.keys)} rows, dim {self.embeddings.shape[1]}, from {self.source}{extra})"


def iter_batches(
    path: Path | str | None, batch_size: int = 65536, files: Sequence[Path] | None = None, columns: Sequence[str] = ()
) -> Iterator[Batch]:
    """Stream every embedding shard as float32 batches; memory stays at one batch (plus Parquet's row group).

    ``columns`` names extra columns (e.g. ``json``) to read; they arrive in ``Batch.extra`` as lists.
    """
    files = list(files) if files is not None else list_shards(path)
    check_consistent([shard_info(f) for f in files])
    base = list(BASE_COLUMNS)
    wanted = [c for c in dict.fromkeys(columns) if c not in base]
    for f in files:
        pf = pq.ParquetFile(f)
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{f}: no column {missing[0]!r}; the file has {', '.join(pf.schema_arrow.names)}")
        for rb in _unbroken(f, pf.iter_batches(batch_size=batch_size, columns=base + wanted)):
            yield Batch(
                keys=rb.column("key").to_pylist(),
                shards=rb.column("shard").to_pylist(),
                indices=rb.column("index").to_numpy(zero_copy_only=False),
                labels=rb.column("label").to_pylist(),
                embeddings=embedding_matrix(rb.column("embedding")),
                source=f,
                extra={c: rb.column(c).to_pylist() for c in wanted},
            )


def _unbroken(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """A file's record batches; a corrupt page or one cut short is a clear error naming the file."""
    try:
        yield from batches
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}); rerun `embedpipe embed` to redo its shard") from None


def read_all(path: Path | str, files: Sequence[Path] | None = None, columns: Sequence[str] = ()) -> Batch:
    """Every embedding under ``path`` in one Batch (for sets that fit in memory)."""
    parts = list(iter_batches(path, files=files, columns=columns))
    if not parts:
        raise UserError(f"embedding shards under {path} hold no rows")
    return Batch(
        keys=[k for p in parts for k in p.keys],
        shards=[s for p in parts for s in p.shards],
        indices=np.concatenate([p.indices for p in parts]),
        labels=[lab for p in parts for lab in p.labels],
        embeddings=np.concatenate([p.embeddings for p in parts]),
        source=Path(path),
        extra={c: [v for p in parts for v in p.extra[c]] for c in parts[0].extra},
    )
