"""``embedpipe index``: build a complete index directory from every embedding shard, tuned against exact search."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import atomic, store
from ..embedding.folder_view import committed_files
from ..errors import UserError
from . import text_recall, tune
from .add import add_shards, new_index, shard_table, train, report_duplicates
from .auto import pick
from .choose import choose
from .kinds import get_kind
from .layout import IDS_FILE, INDEX_FILE, META_FILE, IdsWriter, result, write_record
from .record import IndexRecord
from .options import IndexConfig

log = logging.getLogger(__name__)


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Entry point of ``embedpipe index``: build, update, train-only or build one part.

    Example:
        >>> run_index(IndexConfig("runs/a", out="runs/a/index"))  # doctest: +SKIP
    """
    budget = cfg.validate()
    full = cfg.resolved()  # builds tune at the given target or the default; --update compares a given one
    if cfg.train_only:
        from .parts import train_only

        return train_only(full, budget)
    if cfg.parts is not None:
        from .parts import build_part

        return build_part(full)
    if cfg.update:
        if not (Path(cfg.out) / META_FILE).exists() and not Path(cfg.out).exists():
            log.info("%s does not exist yet: --update builds it", cfg.out)  # a cron job's first run
            return build(full, budget)
        from .update import update

        return update(cfg)
    return build(full, budget)


def build(cfg: IndexConfig, budget: int) -> dict[str, Any]:
    """Build a complete index directory at ``cfg.out`` from every shard under ``cfg.emb_dir``."""
    import faiss

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass --update to add new shards to it, or --overwrite to rebuild")
    src = store.scan(cfg.emb_dir, committed_files(cfg.emb_dir))  # garbage is refused, never indexed
    n = src.rows
    if n == 0:
        raise UserError(f"embedding shards under {cfg.emb_dir} hold no rows; did `embedpipe embed` skip everything?")
    t0 = time.perf_counter()
    choice, measured = choose(cfg.kind, n, src.dim, budget, cfg.factory), None
    if cfg.kind == "auto" and not cfg.factory and not get_kind(choice.kind).exact:
        choice, measured = pick(src, cfg, budget)
    if choice.estimated_bytes > budget:
        log.warning("%s needs ~%.2f GB, over --memory %.2f GB", choice.factory, choice.estimated_bytes / 1e9,
                    budget / 1e9)
    index = new_index(choice.factory, src.dim, cfg.metric)  # a bad --factory fails before any data is read
    report_duplicates(src.files)
    q_rows, t_rows = tune.pick_rows(n, cfg.n_queries(n), choice.train_size, cfg.seed)
    queries, sample = tune.read_rows(src.files, [q_rows, t_rows], cfg.batch_size)
    train_s = train(index, sample, choice.factory)
    del sample
    gt = tune.ExactKnn(queries, tune.TUNE_K + tune.GT_EXTRA, cfg.metric)
    texts = text_recall.embedded_texts(src.meta, cfg.text_queries)  # an image-text model's: also measured
    text_gt = text_recall.text_knn(texts[0], cfg.metric) if texts else None
    shards, starts = shard_table(src, 0)
    # The tuning queries stay out of the index until it is tuned, so that they are fresh queries (an HNSW graph
    # finds the neighbours of its own points more easily); indexes numbering vectors in add order cannot.
    space = tune.search_space(index, choice.kind, choice.factory)
    hold = tune.takes_ids(index) and bool(space)
    with atomic.locked_dir(out), atomic.staged_dir(out) as tmp:
        ids_out = IdsWriter(tmp / IDS_FILE)
        add_shards(index, src.files, starts, ids_out, gt, cfg.batch_size, hold_out=q_rows if hold else None,
                   every_row=text_gt)
        ids_out.close()
        _, gt_ids = gt.result()
        tuning = tune.tune(index, queries, q_rows, gt_ids, cfg.target_recall, space=space, held_out=hold)
        if hold:
            index.add_with_ids(queries, q_rows)
        text_rec = (text_recall.measure(index, texts[0], text_gt, texts[1], tuning.params, space, cfg.target_recall)
                    if texts else None)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        record = IndexRecord.new(
            factory=choice.factory, kind=choice.kind, reason=choice.reason, metric=cfg.metric, dim=src.dim,
            count=int(index.ntotal), embedding_dtype=src.dtype, tuning=tuning.to_dict(), memory_budget=budget,
            estimated_bytes=choice.estimated_bytes, source=str(Path(cfg.emb_dir).resolve()), shards=shards,
            embedding_meta=src.meta, config=asdict(cfg), auto=measured, text_queries=text_rec,
            build_seconds={"auto": measured.get("seconds", 0.0) if measured else 0.0, "train": round(train_s, 2),
                           "total": round(time.perf_counter() - t0, 2)})
        record = write_record(tmp, record)
    return result(out, record)
