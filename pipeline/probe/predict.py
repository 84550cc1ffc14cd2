"""``embedpipe predict``: classify every embedding with a trained probe, one Parquet file per embedding shard."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .. import store
from .head import check_features, load_head
from .options import PREDICT_BATCH

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
PREDICTION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                               ("class", pa.int64()), ("class_name", pa.string()), ("probability", pa.float32())])


def run_predict(probe_dir: str | Path, emb_dir: str | Path, out: str | Path | None = None,
                batch_size: int = PREDICT_BATCH) -> dict[str, Any]:
    """Predict every row of ``emb_dir``; one Parquet file per embedding shard under ``out``.

    Columns: ``key``, ``shard``, ``index``, ``class`` (int64 class id, index into head.pt ``classes``),
    ``class_name`` (string) and ``probability`` (float32 softmax of the predicted class).

    Example:
        >>> run_predict("runs/probe", "runs/new-images", "runs/new-images/predictions")["rows"]
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
        for b in store.iter_batches(None, batch_size=batch_size, files=[f]):
            with torch.no_grad():
                p = torch.softmax(head.logits(b.embeddings), 1)
            prob, cls = p.max(1)
            parts.append(pa.table([b.keys, b.shards, b.indices.astype(np.int32), cls.numpy(),
                                   names[cls.numpy()].tolist(), prob.numpy().astype(np.float32)],
                                  schema=PREDICTION_SCHEMA))
        table = pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table()
        store.write_table(out_dir / f.name, table)
        rows += table.num_rows
    log.info("predicted %d rows into %s", rows, out_dir)
    return {"rows": rows, "files": len(files), "out": str(out_dir)}
