"""Filling a FAISS index: create it from a factory string, train it on a sample, stream shards in with their ids."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import store
from . import keys
from ..errors import UserError
from ..progress import Progress
from .choose import faiss_metric
from .layout import IdsWriter
from .record import ShardEntry, now
from .tune import ExactKnn, takes_ids

log = logging.getLogger(__name__)

CRASH_ENV = "EMBEDPIPE_INDEX_CRASH_AT"  # test hook: raise after this many added batches


def new_index(factory: str, dim: int, metric: str) -> Any:
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
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
               gt: ExactKnn | None, batch_size: int, desc: str = "adding", hold_out: np.ndarray | None = None,
               every_row: ExactKnn | None = None) -> int:
    """Stream ``files`` into ``index`` with ids ``id_start + row``, recording ids and feeding the exact k-NN.

    ``hold_out`` (sorted ids, for an index that takes explicit ids) are recorded but neither added nor fed to the
    exact k-NN: they are the tuning queries, added by the caller once tuning is done. ``every_row`` is an exact
    k-NN fed every row, held out or not (the text queries': the finished index holds every row).
    """
    # IVF and IDMap indexes take explicit ids (needed for parts and held-out queries); the others number vectors
    # in add order, which we check
    ivf = takes_ids(index)
    if hold_out is not None and not ivf:
        raise RuntimeError("rows can be held out only of an index that takes explicit ids")
    crash_at = int(os.environ.get(CRASH_ENV, "0") or 0)
    total = sum(store.shard_info(f).rows for f in files)
    added = batches = 0
    log.info("%s %d vectors from %d shard(s)", desc, total, len(files))
    with Progress(log, desc, total=total, unit="vec") as bar:
        for f, id_start in zip(files, id_starts):
            row = 0
            for batch in store.iter_batches(None, batch_size=batch_size, files=[f]):
                n = len(batch.keys)
                rows = np.arange(row, row + n, dtype=np.int64)
                ids = id_start + rows
                x = np.ascontiguousarray(batch.embeddings, np.float32)
                bad = ~np.isfinite(x).all(axis=1)
                if bad.any():  # FAISS would index them, and every search near them returns garbage
                    raise UserError(f"{f}: {int(bad.sum())} embedding(s) with NaN or Inf (first key "
                                    f"{batch.keys[int(np.argmax(bad))]!r}); none is indexed. If the file was edited, "
                                    "rerun `embedpipe embed` to redo its shard; if the model made them, re-embed with "
                                    "--precision fp32")
                ids_out.write(ids, batch, rows)
                if every_row is not None:
                    every_row.add(x, ids)
                if hold_out is not None:
                    keep = ~np.isin(ids, hold_out, assume_unique=True)
                    x, ids = x[keep], ids[keep]
                if ivf:
                    index.add_with_ids(x, ids)
                else:
                    if index.ntotal != ids[0]:
                        raise RuntimeError(f"sequential id mismatch: index has {index.ntotal}, next id {ids[0]}")
                    index.add(x)
                if gt is not None:
                    gt.add(x, ids)
                row += n
                added += n
                batches += 1
                bar.update(n)
                if crash_at and batches >= crash_at:
                    raise RuntimeError(f"{CRASH_ENV}={crash_at}: simulated crash after {batches} batches")
    return added


def shard_table(src: store.Source, start: int) -> tuple[dict[str, ShardEntry], list[int]]:
    """The index record's per-shard entries (rows, first id) and the first id of each file."""
    table, starts = {}, []
    for f, info in zip(src.files, src.infos):
        table[f.name] = ShardEntry(info.rows, start, now())
        starts.append(start)
        start += info.rows
    return table, starts


def report_duplicates(files: Sequence[Path]) -> None:
    """Say what the rows to index hold twice: a (shard, key) on several rows (warned: searches return it twice),
    keys that several shards hold (different items, answered per shard)."""
    dup = keys.duplicates(keys.file_rows(files))
    if dup.repeated_rows:
        log.warning("%s", dup.repeated_text())
    if dup.shared_keys:
        log.info("%s", dup.shared_text())
