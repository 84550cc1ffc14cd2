"""Tuning a built index against exact search: held-out query rows, exact k-NN, recall, the smallest search parameter
reaching the target recall, latency and throughput."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .. import store
from ..errors import UserError
from .choose import faiss_metric

log = logging.getLogger(__name__)

GT_EXTRA = 1  # the query itself is in the data: search k+1 and drop it


def pick_rows(n: int, n_queries: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted global row numbers for queries and for training, disjoint (queries are held out of training)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    nq = min(n_queries, n)
    q = np.sort(perm[:nq])
    t = np.sort(perm[nq:nq + n_train]) if n - nq >= n_train else np.sort(perm[nq:])
    return q, t


def read_rows(files: Sequence[Path], wanted: Iterable[np.ndarray], batch_size: int = 65536) -> list[np.ndarray]:
    """Read rows by global row number (over ``files`` in order), for several sorted row lists at once."""
    wanted = [np.asarray(w, dtype=np.int64) for w in wanted]
    out: list[list[np.ndarray]] = [[] for _ in wanted]
    start = 0
    for batch in store.iter_batches(None, batch_size=batch_size, files=files):
        stop = start + len(batch.keys)
        for o, w in zip(out, wanted):
            lo, hi = np.searchsorted(w, [start, stop])
            if hi > lo:
                o.append(batch.embeddings[w[lo:hi] - start])
        start = stop
    dim = store.shard_info(files[0]).dim
    return [np.concatenate(o) if o else np.zeros((0, dim), np.float32) for o in out]


class ExactKnn:
    """Exact k-NN of fixed queries, fed the database batch by batch (the whole set is never in memory)."""

    def __init__(self, queries: np.ndarray, k: int, metric: str):
        import faiss

        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.metric = faiss_metric(metric)
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        import faiss

        if len(self.queries) == 0 or len(xb) == 0:
            return
        d, i = faiss.knn(self.queries, np.ascontiguousarray(xb), min(self.k, len(xb)), metric=self.metric)
        i = np.where(i >= 0, np.asarray(ids, np.int64)[np.maximum(i, 0)], -1)
        if d.shape[1] < self.k:  # pad a tiny batch to k columns
            pad = self.k - d.shape[1]
            fill = -np.inf if self.metric == faiss.METRIC_INNER_PRODUCT else np.inf
            d = np.hstack([d, np.full((len(d), pad), fill, np.float32)])
            i = np.hstack([i, np.full((len(i), pad), -1, np.int64)])
        self.heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i, np.int64))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.heap.finalize()
        return self.heap.D, self.heap.I


def merge_knn(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Combine exact k-NN results computed on disjoint subsets (one per index part) into the global k-NN."""
    import faiss

    heap = faiss.ResultHeap(len(parts[0][0]), k, keep_max=metric == "ip")
    for d, i in parts:
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i, np.int64))
    heap.finalize()
    return heap.D, heap.I


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its result row and keep the first ``k`` of the rest."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, s) in enumerate(zip(ids, self_ids)):
        row = row[row != s][:k]
        out[r, :len(row)] = row
    return out


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k (truth entries of -1 are ignored)."""
    hits = 0
    total = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = t[t >= 0]
        hits += len(np.intersect1d(f, t))
        total += len(t)
    return hits / total if total else 1.0


@dataclass
class Tuning:
    """Tuned search parameter and the measured quality/speed of the index with it."""

    params: dict[str, int] = field(default_factory=dict)
    recall_at_1: float = 1.0
    recall_at_10: float = 1.0
    target_recall: float = 0.95
    target_reached: bool = True
    queries: int = 0
    latency_ms_p50: float = 0.0
    qps: float = 0.0
    curve: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "recall@1": round(self.recall_at_1, 4), "recall@10": round(self.recall_at_10, 4),
                "target_recall": self.target_recall, "target_reached": self.target_reached, "queries": self.queries,
                "latency_ms_p50": round(self.latency_ms_p50, 3), "qps": round(self.qps, 1), "curve": self.curve,
                "method": "held-out rows of the data as queries (not in the training sample), the query's own id "
                          "excluded from both exact and approximate results"}


def search_params(index: Any) -> list[tuple[str, list[int]]]:
    """The parameters that trade speed for recall on ``index``, main one first, each with ascending candidates.

    ``nprobe`` (IVF) or ``efSearch`` (HNSW); then ``k_factor_rf`` when a refine stage re-ranks a shortlist.
    """
    import faiss

    out: list[tuple[str, list[int]]] = []
    inner, refine = faiss.downcast_index(index), False
    while isinstance(inner, (faiss.IndexPreTransform, faiss.IndexRefine, faiss.IndexIDMap)):
        refine = refine or isinstance(inner, faiss.IndexRefine)
        inner = faiss.downcast_index(inner.base_index if isinstance(inner, faiss.IndexRefine) else inner.index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        out.append(("nprobe", list(range(1, ivf.nlist + 1))))
    elif isinstance(inner, faiss.IndexHNSW):
        out.append(("efSearch", list(range(16, 4097))))
    if refine:
        out.append(("k_factor_rf", list(range(1, 65))))
    return out


def set_params(index: Any, params: dict[str, int]) -> None:
    """Apply search parameters (``nprobe``, ``efSearch``, ...) through FAISS's ParameterSpace."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError as e:
            raise UserError(f"search parameter {name}={value} does not apply to this index: {e}") from None


def measure(index: Any, queries: np.ndarray, self_ids: np.ndarray, truth: np.ndarray, k: int = 10
            ) -> tuple[float, float]:
    """recall@1 and recall@k of ``index`` against exact ``truth`` (self excluded)."""
    _, found = index.search(queries, k + GT_EXTRA)
    found = drop_self(found, self_ids, k)
    r1 = float(np.mean(found[:, 0] == truth[:, 0])) if len(truth) else 1.0
    return r1, recall(found, truth, k)


def tune(index: Any, queries: np.ndarray, self_ids: np.ndarray, gt_ids: np.ndarray, target: float, k: int = 10
         ) -> Tuning:
    """Smallest ``nprobe``/``efSearch`` reaching ``target`` recall@k against exact search, then latency and QPS.

    Doubles the parameter until the target is met, then bisects down to the smallest value that meets it.
    """
    truth = drop_self(gt_ids, self_ids, k)
    t = Tuning(target_recall=target, queries=len(queries))
    space = search_params(index) if len(queries) else []
    if space:
        log.info("tuning %s to recall@%d >= %s on %d held-out queries", "/".join(n for n, _ in space), k, target,
                 len(queries))
        set_params(index, {name: values[-1] for name, values in space[1:]})  # secondaries generous while tuning
        for name, values in space:
            v, r = _smallest(index, name, values, lambda: measure(index, queries, self_ids, truth, k), target, t)
            t.params[name] = v
            t.recall_at_1, t.recall_at_10 = r
            if r[1] < target:
                t.target_reached = False
                log.warning("recall@%d target %.3f not reached: best %.4f at %s=%d", k, target, r[1], name, v)
                break
        set_params(index, t.params)
        t.recall_at_1, t.recall_at_10 = measure(index, queries, self_ids, truth, k)
        t.curve.sort()
    elif len(queries):
        t.recall_at_1, t.recall_at_10 = measure(index, queries, self_ids, truth, k)
    t.target_reached = t.target_reached and t.recall_at_10 >= target
    t.latency_ms_p50, t.qps = speed(index, queries, k)
    return t


def _smallest(index: Any, name: str, values: list[int], score: Any, target: float, t: Tuning
              ) -> tuple[int, tuple[float, float]]:
    """Smallest ``name`` in ``values`` whose recall@k reaches ``target``: doubling, then bisection."""
    cache: dict[int, tuple[float, float]] = {}

    def at(v: int) -> tuple[float, float]:
        if v not in cache:
            set_params(index, {name: v})
            cache[v] = score()
            t.curve.append([name, v, round(cache[v][1], 4)])
            log.debug("%s=%d recall@10=%.4f", name, v, cache[v][1])
        return cache[v]

    lo_v, hi_v = values[0], values[-1]
    v = lo_v
    while at(v)[1] < target and v < hi_v:
        v = min(hi_v, v * 2)
    if at(v)[1] < target:
        return v, at(v)
    lo, hi = max(lo_v, v // 2), v
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    set_params(index, {name: hi})
    return hi, at(hi)


def speed(index: Any, queries: np.ndarray, k: int = 10, budget_s: float = 2.0) -> tuple[float, float]:
    """Median single-query latency (ms; up to 200 queries or ``budget_s``) and batch throughput (queries/s)."""
    if len(queries) == 0:
        return 0.0, 0.0
    lat: list[float] = []
    start = time.perf_counter()
    for q in queries[:200]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        lat.append(time.perf_counter() - t0)
        if len(lat) >= 5 and t0 - start > budget_s:
            break
    batch = queries[: max(len(lat) * 5, 100)] if lat and np.median(lat) > 0.005 else queries  # exact search is slow
    t0 = time.perf_counter()
    index.search(batch, k)
    return float(np.median(lat) * 1e3), len(batch) / max(time.perf_counter() - t0, 1e-9)
