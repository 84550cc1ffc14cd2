"""Embedding shards on disk: the Parquet schema, atomic writes, done records, reading back in batches."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

EMBEDDINGS = "embeddings"
STATE = "_state"
META_KEY = b"embedpipe"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; outputs get the usual permissions instead


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or absent (tmp + fsync + replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def embedding_table(
    keys: Sequence[str],
    shard: str,
    indices: Sequence[int],
    labels: Sequence[int | None],
    embeddings: np.ndarray,
    dtype: str = "float16",
    extra: dict[str, Sequence[str | None]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> pa.Table:
    """Build one shard's table in the STYLE.md schema; ``metadata`` lands in the file's key-value metadata."""
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
        table = table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True, default=str)})
    return table


def remove_stale_temps(folder: Path, names: Sequence[str]) -> int:
    """Delete the temporary files (``.NAME.<random>.tmp``) a killed writer left for these file names in ``folder``.

    Only for names this process alone writes (its own shards, under its lock); returns how many went.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    wanted = re.compile(r"^\.(%s)\.[A-Za-z0-9_]+\.tmp$" % "|".join(re.escape(n) for n in names)) if names else None
    gone = 0
    for p in folder.iterdir() if wanted else ():
        if wanted.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone += 1
    return gone


COMMIT = ".commit.json"  # journal of a multi-file commit (write_files_atomic)


def write_files_atomic(folder: Path, files: dict[str, bytes]) -> None:
    """Replace several files of ``folder`` as one: after a crash a reader sees all old or all new ones.

    Each file goes to a temporary name; the journal ``.commit.json`` (final name -> temporary name), written
    atomically, is the commit point; then the renames. :func:`recover_files`, called by writers and readers
    of the folder, finishes a commit a crash interrupted; the temporaries of an uncommitted one are dropped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover_files(folder)
    remove_stale_temps(folder, [*sorted(files), COMMIT])
    tmps: dict[str, str] = {}
    try:
        for name, data in files.items():
            tmp = _temp_beside(folder / name)
            tmps[name] = Path(tmp).name
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(folder / COMMIT, tmps)
    except BaseException:
        for t in tmps.values():
            (folder / t).unlink(missing_ok=True)
        raise
    recover_files(folder)


def recover_files(folder: Path) -> None:
    """Finish the multi-file commit of :func:`write_files_atomic` that a crash interrupted, if any."""
    journal = Path(folder) / COMMIT
    try:
        plan = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    for name, tmp in plan.items():
        if Path(name).name != name or Path(tmp).name != tmp:
            raise UserError(f"{journal} names a file outside its folder ({name!r}); delete it")
        try:
            os.replace(Path(folder) / tmp, Path(folder) / name)
        except FileNotFoundError:
            pass  # renamed already
    journal.unlink(missing_ok=True)


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two existing directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_table_atomic(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically. The embedding column skips dictionary encoding (it never repeats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        dict_cols = [c for c in table.column_names if c != "embedding"]
        pq.write_table(table, tmp, use_dictionary=dict_cols, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The embedpipe metadata stored in one Parquet shard (empty dict when absent)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else {}


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int
    dim: int
    dtype: str
    metadata: dict[str, Any]


def shard_info(path: Path) -> ShardInfo:
    pf = pq.ParquetFile(path)
    field = pf.schema_arrow.field("embedding")
    if not pa.types.is_fixed_size_list(field.type):
        raise UserError(f"{path}: column 'embedding' is {field.type}, expected fixed_size_list<float>[D]")
    names = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}
    dtype = names.get(field.type.value_type)
    if dtype is None:
        raise UserError(f"{path}: embedding values are {field.type.value_type}, expected float16 or float32")
    return ShardInfo(path, pf.metadata.num_rows, field.type.list_size, dtype, read_metadata(path))


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


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as a float32 [N, D] matrix, without going through Python objects."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


@dataclass
class Batch:
    keys: list[str]
    shards: list[str]
    indices: np.ndarray
    labels: list[int | None]
    embeddings: np.ndarray  # float32 [N, D]
    source: Path
    extra: dict[str, list[Any]] = field(default_factory=dict)  # requested non-base columns, as Python lists


def iter_batches(
    path: Path | str, batch_size: int = 65536, files: Sequence[Path] | None = None, columns: Sequence[str] = ()
) -> Iterator[Batch]:
    """Stream every embedding shard as float32 batches; memory stays at one batch (plus Parquet's row group).

    ``columns`` names extra columns (e.g. ``json``) to read; they arrive in ``Batch.extra`` as lists.
    """
    files = list(files) if files is not None else list_shards(path)
    check_consistent([shard_info(f) for f in files])
    base = ["key", "shard", "index", "label", "embedding"]
    wanted = [c for c in dict.fromkeys(columns) if c not in base]
    for f in files:
        pf = pq.ParquetFile(f)
        missing = [c for c in wanted if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{f}: no column {missing[0]!r}; the file has {', '.join(pf.schema_arrow.names)}")
        for rb in pf.iter_batches(batch_size=batch_size, columns=base + wanted):
            yield Batch(
                keys=rb.column("key").to_pylist(),
                shards=rb.column("shard").to_pylist(),
                indices=rb.column("index").to_numpy(zero_copy_only=False),
                labels=rb.column("label").to_pylist(),
                embeddings=embedding_matrix(rb.column("embedding")),
                source=f,
                extra={c: rb.column(c).to_pylist() for c in wanted},
            )


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
