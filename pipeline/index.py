"""Build a FAISS index from embedding shards: auto choice, streaming add, id→key table, tuning, --update, atomic dirs.

An index directory holds ``index.faiss`` (plus ``merged.ivfdata`` and ``trained.faiss`` when merged from parts),
``ids.parquet`` (FAISS id → key, shard, index, file, row; row i holds id i) and ``index.json``. It is built in a
temporary sibling directory and swapped in, so it is always complete or absent.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__, store
from . import index_tune as tune
from .errors import UserError

log = logging.getLogger(__name__)

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.parquet", "index.json"
IVFDATA, TRAINED = "merged.ivfdata", "trained.faiss"
FORMAT = "embedpipe-index/1"
MODEL_KEYS = ("model", "weights_sha256", "layer", "preprocess")
IDS_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                        ("file", pa.string()), ("row", pa.int64())])
CRASH_ENV = "EMBEDPIPE_INDEX_CRASH_AT"  # test hook: raise after this many added batches


@dataclass(frozen=True)
class IndexConfig:
    """Options of ``embedpipe index`` (validated by :func:`validate` before any data is read)."""

    emb_dir: str
    out: str
    kind: str = "auto"
    factory: str | None = None
    metric: str = "ip"
    memory: str = "8GB"
    target_recall: float = 0.95
    update: bool = False
    overwrite: bool = False
    parts: int | None = None
    part: int | None = None
    train_only: bool = False
    queries: int = 1000
    batch_size: int = 65536
    seed: int = 0


def validate(cfg: IndexConfig) -> int:
    """Check every option up front; returns the memory budget in bytes."""
    if cfg.kind not in tune.KINDS:
        raise UserError(f"--kind {cfg.kind!r} is unknown; use one of {', '.join(tune.KINDS)}")
    if cfg.factory and cfg.kind != "auto":
        raise UserError("give either --kind or --factory, not both")
    if cfg.metric not in tune.METRICS:
        raise UserError(f"--metric {cfg.metric!r} is unknown; use ip (normalised embeddings) or l2")
    if not 0 < cfg.target_recall <= 1:
        raise UserError(f"--target-recall {cfg.target_recall} must be in (0, 1], e.g. 0.95")
    if cfg.queries < 1 or cfg.batch_size < 1:
        raise UserError("--queries and --batch-size must be positive")
    if (cfg.parts is None) != (cfg.part is None) and not cfg.train_only:
        raise UserError("--parts N and --part I go together (I in 0..N-1); --train-only needs neither")
    if cfg.parts is not None and cfg.part is not None and not 0 <= cfg.part < cfg.parts:
        raise UserError(f"--part {cfg.part} is out of range for --parts {cfg.parts}; use 0..{cfg.parts - 1}")
    if cfg.update and (cfg.parts is not None or cfg.train_only or cfg.overwrite):
        raise UserError("--update adds new shards to an existing index; it cannot be combined with "
                        "--parts/--train-only/--overwrite")
    return tune.parse_memory(cfg.memory)


# ---------------------------------------------------------------- shards and metadata


@dataclass
class Source:
    """The embedding shards to read, checked for one dim, one dtype and one model."""

    files: list[Path]
    infos: list[store.ShardInfo]
    dim: int
    dtype: str
    meta: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.infos)


def model_of(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta[k] for k in MODEL_KEYS if k in meta}


def check_same_model(expected: dict[str, Any], got: dict[str, Any], where: str, fix: str) -> None:
    """Refuse vectors from another model than the index's (only keys both sides record are compared)."""
    diff = [k for k in MODEL_KEYS if k in expected and k in got and expected[k] != got[k]]
    if diff:
        detail = "; ".join(f"{k}: index has {expected[k]!r}, {where} has {got[k]!r}" for k in diff)
        raise UserError(f"{where} was embedded with another model than the index ({detail}); {fix}")


def scan(emb_dir: str | Path, files: Sequence[Path] | None = None) -> Source:
    """List and check the shards under ``emb_dir`` (mixed dims, dtypes or models are errors)."""
    files = list(files) if files is not None else store.list_shards(emb_dir)
    infos = [store.shard_info(f) for f in files]
    ref = store.check_consistent(infos)
    for info in infos[1:]:
        check_same_model(model_of(ref.metadata), model_of(info.metadata), str(info.path),
                         f"it differs from {ref.path}; index each model's embeddings separately")
    return Source(files, infos, ref.dim, ref.dtype, dict(ref.metadata))


def read_meta(index_dir: str | Path) -> dict[str, Any]:
    """``index.json`` of an index directory, with a clear error when it is not one."""
    p = Path(index_dir)
    f = p / META_FILE
    if not f.is_file():
        old = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.is_dir() else []
        hint = f" (a swap was interrupted: rename {old[0]} to {p})" if old and not p.exists() else ""
        raise UserError(f"{p} is not an embedpipe index (no {META_FILE}){hint}; build it with `embedpipe index`")
    import json

    return json.loads(f.read_text())


def load_faiss(index_dir: Path, meta: dict[str, Any], mmap: bool = False) -> Any:
    """Read the FAISS index of an index directory (on-disk inverted lists are found next to it)."""
    import faiss

    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.get("on_disk") else 0
    if mmap:
        flags |= faiss.IO_FLAG_MMAP
    return faiss.read_index(str(index_dir / INDEX_FILE), flags)


# ---------------------------------------------------------------- atomic directories


@contextlib.contextmanager
def locked(final: Path) -> Iterator[None]:
    """One writer at a time per index directory (a scheduled --update must not race another)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another embedpipe command is writing {final}; wait for it to finish") from None
        _clean_stale(final)
        yield


def _clean_stale(final: Path) -> None:
    """Under the lock: drop what a killed writer left beside ``final`` (and put back an index it had moved away)."""
    leftovers = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and not final.exists():  # killed between the two renames of the fallback swap
        log.warning("restoring %s from %s", final, leftovers[-1])
        os.rename(leftovers.pop(), final)
    for p in leftovers + list(final.parent.glob(f".{final.name}.tmp-*")):
        log.warning("removing %s, left by an interrupted run", p)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` to build into; swapped in on success, removed on failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists() and store.exchange_dirs(tmp, final):  # one atomic step: readers see old or new
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
            return
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- adding


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


def new_index(factory: str, dim: int, metric: str) -> Any:
    import faiss

    try:
        index = faiss.index_factory(dim, factory, tune.faiss_metric(metric))
    except RuntimeError as e:
        raise UserError(f"FAISS cannot build {factory!r} for dim {dim}: {e}".splitlines()[0]) from None
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # slow to train (minutes at PQ64) and unused by our searches
    return index


def train(index: Any, sample: np.ndarray, factory: str) -> float:
    """Train on ``sample`` (no-op for indexes that need none); returns seconds."""
    t0 = time.perf_counter()
    if not index.is_trained:
        if len(sample) == 0:
            raise UserError(f"{factory} needs training data but the embedding set is empty")
        log.info("training %s on %d vectors", factory, len(sample))
        index.train(np.ascontiguousarray(sample, np.float32))
    return time.perf_counter() - t0


def add_shards(index: Any, files: Sequence[Path], id_starts: Sequence[int], ids_out: IdsWriter,
               gt: tune.ExactKnn | None, batch_size: int, desc: str = "adding") -> int:
    """Stream ``files`` into ``index`` with ids ``id_start + row``, recording ids and feeding the exact k-NN."""
    import faiss
    from tqdm import tqdm

    # IVF indexes take explicit ids (needed for parts); the others number vectors in add order, which we check
    ivf = faiss.try_extract_index_ivf(index) is not None and not isinstance(faiss.downcast_index(index),
                                                                             faiss.IndexRefine)
    crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
    total = sum(store.shard_info(f).rows for f in files)
    added = batches = 0
    with tqdm(total=total, desc=desc, unit="vec", unit_scale=True, disable=None, leave=False) as bar:
        for f, id_start in zip(files, id_starts):
            row = 0
            for batch in store.iter_batches(None, batch_size=batch_size, files=[f]):
                n = len(batch.keys)
                rows = np.arange(row, row + n, dtype=np.int64)
                ids = id_start + rows
                x = np.ascontiguousarray(batch.embeddings, np.float32)
                if ivf:
                    index.add_with_ids(x, ids)
                else:
                    if index.ntotal != ids[0]:
                        raise RuntimeError(f"sequential id mismatch: index has {index.ntotal}, next id {ids[0]}")
                    index.add(x)
                ids_out.write(ids, batch, rows)
                if gt is not None:
                    gt.add(x, ids)
                row += n
                added += n
                batches += 1
                bar.update(n)
                if crash_at and batches >= crash_at:
                    raise RuntimeError(f"{CRASH_ENV}={crash_at}: simulated crash after {batches} batches")
    return added


def shard_table(src: Source, start: int) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """index.json's per-shard record (rows, first id) and the first id of each file."""
    table, starts = {}, []
    for f, info in zip(src.files, src.infos):
        table[f.name] = {"rows": info.rows, "id_start": start, "added": now()}
        starts.append(start)
        start += info.rows
    return table, starts


def warn_duplicate_keys(files: Sequence[Path]) -> None:
    keys = pa.chunked_array([pq.read_table(f, columns=["key"]).column("key") for f in files])
    counts = pc.value_counts(keys)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        log.warning("%d keys occur more than once across shards (e.g. %s); --key lookups return the first",
                    len(dup), dup.field("values")[:3].to_pylist())


# ---------------------------------------------------------------- build


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Entry point of ``embedpipe index``: build, update, train-only or build one part.

    Example:
        >>> run_index(IndexConfig("runs/a", out="runs/a/index"))  # doctest: +SKIP
    """
    budget = validate(cfg)
    from . import index_parts

    if cfg.train_only:
        return index_parts.train_only(cfg, budget)
    if cfg.parts is not None:
        return index_parts.build_part(cfg)
    if cfg.update:
        if not (Path(cfg.out) / META_FILE).exists() and not Path(cfg.out).exists():
            log.info("%s does not exist yet: --update builds it", cfg.out)  # a cron job's first run
            return build(cfg, budget)
        from .index_update import update

        return update(cfg)
    return build(cfg, budget)


def build(cfg: IndexConfig, budget: int) -> dict[str, Any]:
    """Build a complete index directory at ``cfg.out`` from every shard under ``cfg.emb_dir``."""
    import faiss

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass --update to add new shards to it, or --overwrite to rebuild")
    src = scan(cfg.emb_dir)
    n = src.rows
    if n == 0:
        raise UserError(f"embedding shards under {cfg.emb_dir} hold no rows; did `embedpipe embed` skip everything?")
    choice = tune.choose(cfg.kind, n, src.dim, budget, cfg.factory)
    if choice.estimated_bytes > budget:
        log.warning("%s needs ~%.2f GB, over --memory %.2f GB", choice.factory, choice.estimated_bytes / 1e9,
                    budget / 1e9)
    index = new_index(choice.factory, src.dim, cfg.metric)  # a bad --factory fails before any data is read
    warn_duplicate_keys(src.files)
    t0 = time.perf_counter()
    q_rows, t_rows = tune.pick_rows(n, n_queries(cfg, n), choice.train_size, cfg.seed)
    queries, sample = tune.read_rows(src.files, [q_rows, t_rows], cfg.batch_size)
    train_s = train(index, sample, choice.factory)
    del sample
    gt = tune.ExactKnn(queries, 10 + tune.GT_EXTRA, cfg.metric)
    shards, starts = shard_table(src, 0)
    with locked(out), staged(out) as tmp:
        ids_out = IdsWriter(tmp / IDS_FILE)
        add_shards(index, src.files, starts, ids_out, gt, cfg.batch_size)
        ids_out.close()
        _, gt_ids = gt.result()
        tuning = tune.tune(index, queries, q_rows, gt_ids, cfg.target_recall)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        meta = index_meta(cfg, src, choice, index.ntotal, shards, tuning, budget)
        meta["build_seconds"] = {"train": round(train_s, 2), "total": round(time.perf_counter() - t0, 2)}
        store.atomic_write_json(tmp / META_FILE, meta)
    return result(out, meta)


def n_queries(cfg: IndexConfig, n: int) -> int:
    """Held-out tuning queries: ``--queries``, but at most a fifth of the set."""
    return min(cfg.queries, max(1, n // 5))


def index_meta(cfg: IndexConfig, src: Source, choice: tune.Choice, count: int, shards: dict[str, Any],
               tuning: tune.Tuning, budget: int, on_disk: bool = False) -> dict[str, Any]:
    """The ``index.json`` record: what was built, from what, how it was tuned and how well it does."""
    return {
        "format": FORMAT, "version": __version__, "created": now(), "updated": now(),
        "factory": choice.factory, "kind": choice.kind, "reason": choice.reason, "metric": cfg.metric,
        "dim": src.dim, "count": count, "next_id": count, "embedding_dtype": src.dtype,
        "search_params": tuning.params, "tuning": tuning.to_dict(), "tuned_at_count": count,
        "memory_budget": budget, "estimated_bytes": choice.estimated_bytes, "on_disk": on_disk,
        "source": str(Path(cfg.emb_dir).resolve()), "shards": shards,
        "embedding_meta": src.meta, "config": asdict(cfg),
    }


def result(out: Path, meta: dict[str, Any], added: int | None = None) -> dict[str, Any]:
    """What the CLI prints: the summary line and the key facts."""
    t = meta["tuning"]
    params = ", ".join(f"{k}={v}" for k, v in meta["search_params"].items()) or "no search parameters"
    verb = f"added {added} vectors to" if added is not None else "built"
    summary = (f"{verb} {out}: {meta['factory']} ({meta['metric']}), {meta['count']} vectors of dim {meta['dim']} "
               f"from {len(meta['shards'])} shards; {params}; recall@1 {t['recall@1']:.3f}, recall@10 "
               f"{t['recall@10']:.3f} (target {t['target_recall']}), {t['latency_ms_p50']:.2f} ms/query")
    log.info(summary)
    return {"path": str(out), "summary": summary, "meta": meta}
