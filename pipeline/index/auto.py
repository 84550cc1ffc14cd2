"""``--kind auto`` above exact-search sizes: the fastest index at the target recall within the memory budget, measured.

Which kind is fastest at a given recall depends on the size, the dimension, how the data is spread and the machine
(its caches and SIMD units), so no fixed rule gets it right. Each kind that fits the budget (``choose.candidates``)
is built on the same random sample of the data, tuned to the target on fresh queries (rows outside the sample), and
timed on a batch of them; the fastest is then built on the whole set. What was measured goes into ``index.json``
(``auto``). The sample is small enough that this costs well under the build of the winner.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .. import store
from . import tune
from .add import new_index, train
from .choose import Choice, candidates, choose
from .options import IndexConfig
from .tune import TUNE_K as K

log = logging.getLogger(__name__)

SAMPLE_ROWS = 100_000


def pick(src: store.Source, cfg: IndexConfig, budget: int) -> tuple[Choice, dict[str, Any]]:
    """Measure each candidate kind on a sample of ``src``; returns the fastest at ``cfg.target_recall`` and the record.

    Example:
        >>> cfg = IndexConfig("runs/a", out="idx").resolved()  # the default target recall filled in
        >>> choice, record = pick(store.scan("runs/a"), cfg, 8 * 10**9)  # doctest: +SKIP
        >>> record["chosen"], [c["qps"] for c in record["candidates"]]  # doctest: +SKIP
    """
    n, dim = src.rows, src.dim
    cands = candidates(n, dim, budget)
    if len(cands) == 1:
        return cands[0], {"measured": False, "why": f"{cands[0].kind} is the only kind that fits the memory budget"}
    t0 = time.perf_counter()
    nq = cfg.n_queries(n)
    s = min(SAMPLE_ROWS, n - nq)
    q_rows, s_rows = tune.pick_rows(n, nq, s, cfg.seed + 1)
    queries, sample = tune.read_rows(src.files, [q_rows, s_rows], cfg.batch_size)
    sample = sample[np.random.default_rng(cfg.seed).permutation(len(sample))]  # training takes the first rows
    gt = tune.ExactKnn(queries, K + tune.GT_EXTRA, cfg.metric)
    gt.add(sample, np.arange(len(sample)))
    _, gt_ids = gt.result()
    rows = [_measure(c.kind, sample, queries, gt_ids, cfg, budget) for c in cands]
    reached = [r for r in rows if r["target_reached"]] or rows
    best = max(reached, key=lambda r: r["qps"] if r["target_reached"] else r["recall@10"])
    others = ", ".join(f"{r['kind']} {r['qps']:.0f}" for r in rows if r is not best)
    why = (f"fastest at recall@{K} >= {cfg.target_recall} on fresh queries of a {len(sample)}-vector sample: "
           f"{best['kind']} {best['qps']:.0f} queries/s in a batch (vs {others})" if best["target_reached"] else
           f"no kind reached recall@{K} {cfg.target_recall} on a {len(sample)}-vector sample; {best['kind']} came "
           f"closest ({best['recall@10']:.3f})")
    log.info("auto: %s", why)
    chosen = next(c for c in cands if c.kind == best["kind"])
    record = {"measured": True, "sample_rows": len(sample), "queries": nq, "candidates": rows, "chosen": chosen.kind,
              "why": why, "seconds": round(time.perf_counter() - t0, 2)}
    return Choice(chosen.kind, chosen.factory, f"{chosen.reason}; auto: {why}", chosen.nlist, chosen.estimated_bytes,
                  chosen.train_size), record


def _measure(kind: str, sample: np.ndarray, queries: np.ndarray, gt_ids: np.ndarray, cfg: IndexConfig,
             budget: int) -> dict[str, Any]:
    """Build ``kind`` (shaped for the sample's size) on ``sample``, tune it on ``queries``, time a batch search."""
    c = choose(kind, len(sample), sample.shape[1], budget)
    t0 = time.perf_counter()
    index = new_index(c.factory, sample.shape[1], cfg.metric)
    train(index, sample[:c.train_size], c.factory)
    if tune.takes_ids(index):
        index.add_with_ids(sample, np.arange(len(sample)))
    else:
        index.add(sample)
    build_s = time.perf_counter() - t0
    space = tune.search_space(index, c.kind, c.factory)
    t = tune.tune(index, queries, np.full(len(queries), -1), gt_ids, cfg.target_recall, space=space, k=K, held_out=True)
    qps = len(queries) / tune.batch_seconds(index, queries, K, t.params)
    log.info("auto: %s on %d vectors: %s recall@%d %.4f, %.0f queries/s, built in %.1fs", c.factory, len(sample),
             t.params, K, t.recall_at_10, qps, build_s)
    return {"kind": kind, "factory": c.factory, "params": t.params, "recall@10": round(t.recall_at_10, 4),
            "target_reached": t.target_reached, "qps": round(qps, 1), "latency_ms_p50": round(t.latency_ms_p50, 3),
            "build_seconds": round(build_s, 2), "tuning_seconds": round(t.seconds, 2)}
