"""``embedpipe predict``: classify every embedding with a trained probe, one Parquet file per embedding shard."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import store
from ..captions import caption_and_url
from .head import check_features, load_head
from .options import PREDICT_BATCH

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
KEPT = ("txt", "json")  # the stored sample fields a caption and url come from
PREDICTION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                               ("class", pa.int64()), ("class_name", pa.string()), ("probability", pa.float32()),
                               ("caption", pa.string()), ("url", pa.string())])


def run_predict(probe_dir: str | Path, emb_dir: str | Path, out: str | Path | None = None,
                batch_size: int = PREDICT_BATCH) -> dict[str, Any]:
    """Predict every row of ``emb_dir``; one Parquet file per embedding shard under ``out``.

    Columns: ``key``, ``shard``, ``index``, ``class`` (int64 class id, index into head.pt ``classes``),
    ``class_name`` (string), ``probability`` (float32 softmax of the predicted class), and the sample's
    ``caption`` and source ``url`` where the embeddings kept them (img2dataset's ``txt``/``json``; else null).

    Example:
        >>> run_predict("runs/probe", "runs/new-images", "runs/new-images/predictions")["rows"]  # doctest: +SKIP
    """
    head = load_head(probe_dir)
    files = store.list_shards(emb_dir)
    infos = [store.shard_info(f) for f in files]
    store.check_consistent(infos)
    for info in infos:
        check_features(head, info)
    out_dir = Path(out) if out else Path(probe_dir) / PREDICTIONS
    names = np.array(head.class_names, dtype=object)
    rows = 0
    for f in files:
        parts = []
        kept = [c for c in KEPT if c in pq.read_schema(f).names]
        for b in store.iter_batches(None, batch_size=batch_size, files=[f], columns=kept):
            with torch.no_grad():
                p = torch.softmax(head.logits(b.embeddings), 1)
            prob, cls = p.max(1)
            about = [caption_and_url(*(b.extra.get(c, [None] * len(b.keys))[i] for c in KEPT)) for i in range(len(b.keys))]
            parts.append(pa.table([b.keys, b.shards, b.indices.astype(np.int32), cls.numpy(),
                                   names[cls.numpy()].tolist(), prob.numpy().astype(np.float32),
                                   [a.get("caption") for a in about], [a.get("url") for a in about]],
                                  schema=PREDICTION_SCHEMA))
        table = pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table()
        store.write_table(out_dir / f.name, table)
        rows += table.num_rows
    log.info("predicted %d rows into %s", rows, out_dir)
    return {"rows": rows, "files": len(files), "out": str(out_dir)}
