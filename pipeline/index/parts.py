"""Building an IVF index in parts (Slurm array / several machines) and merging them with FAISS's on-disk merge.

``--train-only`` writes ``<OUT>.parts/`` with ``trained.faiss`` (the shared trained, empty index), ``train.json``
(the shard list with each shard's first id, so parts need no coordination) and ``queries.npz`` (held-out tuning
queries); ``--parts N --part I`` writes ``part-IIIII-of-NNNNN/`` (``index.faiss``, ``ids.parquet``, ``gt.npz``
with the exact k-NN of the queries over that part); ``embedpipe index-merge OUT`` merges them into ``OUT``.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import atomic, store
from ..embedding.folder_view import committed_files
from ..errors import UserError
from . import tune
from .add import add_shards, new_index, shard_table, train
from .choose import choose
from .layout import (
    GT,
    IDS_FILE,
    INDEX_FILE,
    IVFDATA,
    PART_JSON,
    QUERIES,
    TRAIN_JSON,
    TRAINED,
    IdsWriter,
    check_dense,
    part_name,
    parts_dir,
    result,
    write_record,
)
from .merge import merge_into
from .options import DEFAULT_TARGET_RECALL, IndexConfig
from .record import IndexRecord, TrainRecord

log = logging.getLogger(__name__)


def part_files(files: Sequence[Path], part: int, parts: int) -> list[Path]:
    """Part ``part`` of ``parts``: a contiguous, disjoint block of the sorted shard list (pure function)."""
    bounds = np.linspace(0, len(files), parts + 1).round().astype(int)
    return list(files[bounds[part]:bounds[part + 1]])


def train_only(cfg: IndexConfig, budget: int) -> dict[str, Any]:
    """Train the shared quantizer (and PQ) on a sample; write it, the shard→id table and the tuning queries."""
    import faiss

    pdir = parts_dir(cfg.out)
    if pdir.exists() and not cfg.overwrite:
        raise UserError(f"{pdir} already exists (a trained quantizer, maybe parts); pass --overwrite to retrain "
                        "(every part must then be rebuilt)")
    src = store.scan(cfg.emb_dir, committed_files(cfg.emb_dir))
    n = src.rows
    if n == 0:
        raise UserError(f"embedding shards under {cfg.emb_dir} hold no rows")
    choice = choose(cfg.kind, n, src.dim, budget, cfg.factory, parts=True)
    index = new_index(choice.factory, src.dim, cfg.metric)
    if faiss.try_extract_index_ivf(index) is None:
        raise UserError(f"--parts needs an IVF index; {choice.factory!r} has no inverted lists (try IVF...,Flat)")
    t0 = time.perf_counter()
    q_rows, t_rows = tune.pick_rows(n, cfg.n_queries(n), choice.train_size, cfg.seed)
    queries, sample = tune.read_rows(src.files, [q_rows, t_rows], cfg.batch_size)
    train_s = train(index, sample, choice.factory)
    shards, _ = shard_table(src, 0)
    with atomic.locked_dir(pdir), atomic.staged_dir(pdir) as tmp:
        faiss.write_index(index, str(tmp / TRAINED))
        np.savez(tmp / QUERIES, queries=queries, rows=q_rows)
        record = TrainRecord(
            factory=choice.factory, kind=choice.kind, reason=choice.reason, metric=cfg.metric, dim=src.dim,
            dtype=src.dtype, count=n, shards=shards, embedding_meta=src.meta, memory_budget=budget,
            estimated_bytes=choice.estimated_bytes, train_seconds=round(train_s, 2),
            source=str(Path(cfg.emb_dir).resolve()), trained_sha256=atomic.file_sha256(tmp / TRAINED), config=asdict(cfg))
        atomic.write_json(tmp / TRAIN_JSON, record.to_dict())
    summary = (f"trained {choice.factory} on {len(sample)} vectors in {time.perf_counter() - t0:.1f}s; wrote {pdir}; "
               f"next: `embedpipe index {cfg.emb_dir} --out {cfg.out} --parts N --part I` for I in 0..N-1")
    return {"path": str(pdir), "summary": summary, "meta": record.to_dict()}


def read_train(pdir: Path) -> TrainRecord:
    f = pdir / TRAIN_JSON
    if not f.is_file():
        out = pdir.name[: -len(".parts")]
        raise UserError(f"{f} is missing; train the shared quantizer first: "
                        f"`embedpipe index EMB_DIR --out {pdir.parent / out} --train-only`")
    return TrainRecord.from_dict(json.loads(f.read_text()), str(f))


def build_part(cfg: IndexConfig) -> dict[str, Any]:
    """Add one disjoint block of shards to a copy of the trained index; write it as ``part-I-of-N``."""
    import faiss

    pdir = parts_dir(cfg.out)
    rec = read_train(pdir)
    src = store.scan(cfg.emb_dir, committed_files(cfg.emb_dir))
    have = {f.name: i.rows for f, i in zip(src.files, src.infos)}
    want = {name: s.rows for name, s in rec.shards.items()}
    if have != want:
        extra = sorted(set(have) - set(want))[:3]
        missing = sorted(set(want) - set(have))[:3]
        raise UserError(f"the shards under {cfg.emb_dir} differ from those the quantizer in {pdir} was trained for "
                        f"(new: {extra}, missing: {missing}); rerun --train-only --overwrite, or use --update later")
    files = part_files(src.files, cfg.part, cfg.parts)
    index = faiss.read_index(str(pdir / TRAINED))
    q = np.load(pdir / QUERIES)
    gt = tune.ExactKnn(q["queries"], tune.TUNE_K + tune.GT_EXTRA, rec.metric)
    name = part_name(cfg.part, cfg.parts)
    t0 = time.perf_counter()
    with atomic.locked_dir(pdir / name), atomic.staged_dir(pdir / name) as tmp:
        ids_out = IdsWriter(tmp / IDS_FILE)
        starts = [rec.shards[f.name].id_start for f in files]
        added = add_shards(index, files, starts, ids_out, gt, cfg.batch_size, desc=name)
        ids_out.close()
        faiss.write_index(index, str(tmp / INDEX_FILE))
        d, i = gt.result()
        np.savez(tmp / GT, D=d, I=i)
        atomic.write_json(tmp / PART_JSON, {"part": cfg.part, "parts": cfg.parts, "files": [f.name for f in files],
                                                  "count": added, "trained_sha256": rec.trained_sha256})
    summary = (f"built {name}: {added} vectors from {len(files)} shards in {time.perf_counter() - t0:.1f}s; "
               f"merge with `embedpipe index-merge {cfg.out}` once all {cfg.parts} parts are done")
    return {"path": str(pdir / name), "summary": summary, "meta": {"count": added, "files": [f.name for f in files]}}


def run_merge(out: str | Path, target_recall: float = DEFAULT_TARGET_RECALL, overwrite: bool = False) -> dict[str, Any]:
    """Merge every part in ``<out>.parts`` into the index directory ``out`` (on-disk inverted lists), then tune.

    Example:
        >>> run_merge("runs/a/index")  # doctest: +SKIP
    """
    import faiss

    out = Path(out)
    pdir = parts_dir(out)
    rec = read_train(pdir)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it with the merged parts")
    found = sorted(p for p in pdir.glob("part-*-of-*") if (p / PART_JSON).is_file())
    if not found:
        raise UserError(f"no parts in {pdir}; build them with `embedpipe index EMB_DIR --out {out} --parts N --part I`")
    infos = [json.loads((p / PART_JSON).read_text()) for p in found]
    n_parts = {i["parts"] for i in infos}
    if len(n_parts) != 1:
        raise UserError(f"{pdir} mixes parts of different --parts counts {sorted(n_parts)}; delete the stale ones")
    (total,) = n_parts
    missing = sorted(set(range(total)) - {i["part"] for i in infos})
    if missing:
        raise UserError(f"{pdir}: parts {missing} of {total} are missing; build them with --parts {total} --part I")
    stale = [p.name for p, i in zip(found, infos) if i["trained_sha256"] != rec.trained_sha256]
    if stale:
        raise UserError(f"{stale} were built against another trained quantizer than {pdir / TRAINED}; rebuild them")
    q = np.load(pdir / QUERIES)
    gts = [np.load(p / GT) for p in found]
    _, gt_ids = tune.merge_knn([(g["D"], g["I"]) for g in gts], tune.TUNE_K + tune.GT_EXTRA, rec.metric)
    t0 = time.perf_counter()
    with atomic.locked_dir(out), atomic.staged_dir(out) as tmp:
        index = merge_into(faiss.read_index(str(pdir / TRAINED)), [p / INDEX_FILE for p in found],
                           tmp / IVFDATA)
        shutil.copyfile(pdir / TRAINED, tmp / TRAINED)
        ids_out = IdsWriter(tmp / IDS_FILE)
        for p in found:
            ids_out.copy_from(p / IDS_FILE)
        ids_out.close()
        check_dense(tmp / IDS_FILE, index.ntotal)
        space = tune.search_space(index, rec.kind, rec.factory)
        tuning = tune.tune(index, q["queries"], q["rows"], gt_ids, target_recall, space=space)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        record = IndexRecord.new(
            factory=rec.factory, kind=rec.kind, reason=rec.reason, metric=rec.metric, dim=rec.dim,
            count=int(index.ntotal), embedding_dtype=rec.dtype, tuning=tuning.to_dict(),
            memory_budget=rec.memory_budget, estimated_bytes=rec.estimated_bytes, source=rec.source,
            shards=rec.shards, embedding_meta=rec.embedding_meta, config=rec.config, on_disk=True,
            merged_from_parts=total, build_seconds={"merge_and_tune": round(time.perf_counter() - t0, 2)})
        record = write_record(tmp, record)
    return result(out, record)
