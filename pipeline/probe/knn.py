"""k-NN classification on frozen features (cosine similarity, DINO's temperature-weighted vote)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import atomic
from ..errors import UserError
from .labels import LabelSource, StreamSet, plan_stream
from .options import KNN_KS, KNN_TEMPERATURE, VAL_FRACTION, ProbeOptions

log = logging.getLogger(__name__)


def knn_scores(
    train_batches: Iterable[tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    n_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 4096,
) -> dict[int, torch.Tensor]:
    """Class scores ``[Q, C]`` for each k: the k most cosine-similar training rows vote ``exp(sim / T)``.

    Training rows are streamed batch by batch; a running top-k per query is kept, so only the queries
    (and one training batch) are in memory.

    Example:
        >>> scores = knn_scores([(x_train, y_train)], x_val, n_classes=10)  # doctest: +SKIP
        >>> pred = scores[20].argmax(1)  # doctest: +SKIP
    """
    kmax = max(ks)
    q = F.normalize(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), dim=1)
    best_sim = torch.full((len(q), 0), -2.0)
    best_lab = torch.zeros((len(q), 0), dtype=torch.long)
    for xb, yb in train_batches:
        t = F.normalize(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)), dim=1)
        y = torch.from_numpy(np.asarray(yb, dtype=np.int64))
        for i in range(0, len(q), chunk):
            sim = q[i:i + chunk] @ t.T
            kk = min(kmax, sim.shape[1])
            s, j = sim.topk(kk, dim=1)
            cand_s = torch.cat([best_sim[i:i + chunk], s], 1)
            cand_l = torch.cat([best_lab[i:i + chunk], y[j]], 1)
            keep = min(kmax, cand_s.shape[1])
            top_s, top_j = cand_s.topk(keep, dim=1)
            if i == 0:
                new_s = torch.empty((len(q), keep))
                new_l = torch.empty((len(q), keep), dtype=torch.long)
            new_s[i:i + chunk] = top_s
            new_l[i:i + chunk] = cand_l.gather(1, top_j)
        best_sim, best_lab = new_s, new_l
    if best_sim.shape[1] == 0:
        raise UserError("k-NN needs training rows; the training set is empty")
    out = {}
    for k in ks:
        kk = min(k, best_sim.shape[1])
        w = (best_sim[:, :kk] / temperature).exp()
        scores = torch.zeros(len(q), n_classes)
        scores.scatter_add_(1, best_lab[:, :kk], w)
        out[k] = scores
    return out


def run_knn(
    emb_dir: str | Path,
    val: str | Path | None = None,
    val_fraction: float = VAL_FRACTION,
    label_column: str | None = None,
    label_field: str | None = None,
    group_field: str | None = None,
    class_names: str | None = None,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """k-NN accuracy of validation rows against training rows (same split rules as ``probe``).

    Example:
        >>> run_knn("runs/digits", val_fraction=0.2)["top1"]  # doctest: +SKIP
        {10: 0.97, 20: 0.96}
    """
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"--k needs one or more values >= 1, got {list(ks)}")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")
    ProbeOptions(val=str(val) if val else None, group_field=group_field, class_names=class_names).check()
    t0 = time.perf_counter()
    source = LabelSource.make(label_column, label_field)
    group = LabelSource.make(field=group_field) if group_field else None
    train, vset, cmap, split = plan_stream(emb_dir, source, str(val) if val else None, val_fraction, group,
                                           class_names)
    xv, yv = _collect(vset)
    scores = knn_scores(train.batches(), xv, len(cmap), ks, temperature)
    y = torch.from_numpy(yv)
    result: dict[str, Any] = {"top1": {}, "top5": {}, "n_train": len(train), "n_val": len(yv),
                              "num_classes": len(cmap), "classes": cmap.names, "temperature": temperature,
                              "metric": "cosine",
                              "split": split, "emb_dir": str(emb_dir)}
    for k, s in scores.items():
        result["top1"][k] = float((s.argmax(1) == y).float().mean())
        if len(cmap) > 5:
            result["top5"][k] = float((s.topk(5, 1).indices == y[:, None]).any(1).float().mean())
    if not result["top5"]:
        del result["top5"]
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if out:
        atomic.write_json(Path(out), result)
    return result


def _collect(s: StreamSet) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*s.batches())
    return np.concatenate(xs), np.concatenate(ys)
