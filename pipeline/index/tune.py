"""Tuning a built index against exact search: held-out query rows, exact k-NN, recall, the smallest search parameter
reaching the target recall, latency and throughput."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .. import store
from ..errors import UserError
from .choose import faiss_metric
from .kinds import get_kind, kind_names
from .options import DEFAULT_TARGET_RECALL

log = logging.getLogger(__name__)

GT_EXTRA = 1  # the query itself is in the data: search k+1 and drop it
TUNE_K = 10  # every tuning measures recall@10 (index.json's tuning record names it so)


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


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """|found[q, :k] ∩ truth[q, :k]| / |truth[q, :k]| for each query q (truth entries of -1 are ignored)."""
    out = np.ones(len(found))
    for q, (f, t) in enumerate(zip(found[:, :k], truth[:, :k])):
        t = t[t >= 0]
        if len(t):
            out[q] = len(np.intersect1d(f, t)) / len(t)
    return out


MARGIN_SE = 2.0  # aim this many standard errors of the measured recall above the target


@dataclass
class Tuning:
    """Tuned search parameters and the measured quality/speed of the index with them."""

    params: dict[str, int] = field(default_factory=dict)
    recall_at_1: float = 1.0
    recall_at_10: float = 1.0
    target_recall: float = DEFAULT_TARGET_RECALL
    target_reached: bool = True
    queries: int = 0
    held_out: bool = False  # the queries were not in the index while it was tuned (else: in it, self excluded)
    margin: float = 0.0
    latency_ms_p50: float = 0.0
    qps: float = 0.0
    seconds: float = 0.0
    curve: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        where = ("not in the index while it was tuned (added after), so they are fresh queries" if self.held_out else
                 "in the index, each query's own id excluded from exact and approximate results (HNSW graphs find "
                 "the neighbours of indexed points more easily than those of fresh queries: optimistic)")
        return {"params": self.params, "recall@1": round(self.recall_at_1, 4), "recall@10": round(self.recall_at_10, 4),
                "target_recall": self.target_recall, "margin": round(self.margin, 4),
                "aimed_at": round(min(1.0, self.target_recall + self.margin), 4), "target_reached": self.target_reached,
                "queries": self.queries, "queries_held_out": self.held_out,
                "latency_ms_p50": round(self.latency_ms_p50, 3), "qps": round(self.qps, 1),
                "tuning_seconds": round(self.seconds, 2), "curve": self.curve,
                "method": f"random rows of the data as queries, held out of the training sample and {where}; the "
                          f"smallest parameters whose recall@10 reaches the target plus a margin of {MARGIN_SE:g} "
                          "standard errors of that measurement (so fresh queries reach the target too)"}


def takes_ids(index: Any) -> bool:
    """Whether ``index`` stores explicit ids (IVF, or wrapped in ``IDMap``): rows can then be added in any order,
    so the tuning queries can be held out and added after tuning. The others number vectors in add order."""
    import faiss

    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap):
        return True
    return faiss.try_extract_index_ivf(index) is not None and not isinstance(top, faiss.IndexRefine)


def search_space(index: Any, kind: str, factory: str) -> list[tuple[str, list[int]]]:
    """The parameters that trade speed for recall on ``index``, main one first, each with ascending candidates: the
    knobs its kind declares (``kinds/``), or, for a ``--factory`` index (no registered kind), :func:`search_params`."""
    if kind in kind_names():
        return [(knob.name, list(knob.values)) for knob in get_kind(kind).knobs(factory)]
    return search_params(index)


def search_params(index: Any) -> list[tuple[str, list[int]]]:
    """The speed/recall parameters of any FAISS index, found by inspecting it (for ``--factory`` strings).

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
        out.append(("k_factor_rf", list(range(1, 129))))
    return out


def set_params(index: Any, params: dict[str, int]) -> None:
    """Apply search parameters (``nprobe``, ``efSearch``, ...) through FAISS's ParameterSpace."""
    import faiss

    ps = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, value)
        except (RuntimeError, TypeError) as e:  # TypeError: a value that is not a number
            raise UserError(f"search parameter {name}={value} does not apply to this index: {e}") from None


def measure(index: Any, queries: np.ndarray, self_ids: np.ndarray, truth: np.ndarray, k: int = TUNE_K,
            extra: int = GT_EXTRA) -> tuple[float, np.ndarray]:
    """recall@1 and each query's recall@k of ``index`` against exact ``truth``, searching ``k + extra`` to drop self
    (``extra`` 0 for queries not in the index: a refine stage's shortlist is ``k_factor_rf``·k, so k must be k)."""
    _, found = index.search(queries, k + extra)
    found = drop_self(found, self_ids, k)
    r1 = float(np.mean(found[:, 0] == truth[:, 0])) if len(truth) else 1.0
    return r1, per_query_recall(found, truth, k)


def tune(index: Any, queries: np.ndarray, self_ids: np.ndarray, gt_ids: np.ndarray, target: float, *,
         space: list[tuple[str, list[int]]], k: int = TUNE_K, held_out: bool = False) -> Tuning:
    """The fastest search parameters in ``space`` (:func:`search_space`) whose recall@k reaches ``target`` (plus a
    margin) against exact search.

    The main parameter (``nprobe``/``efSearch``) is doubled until the target is met, then bisected down to the
    smallest value that meets it; a refine factor is then bisected the same way, at that value and at 1.5x and 2x
    it (more probes need a shorter shortlist), and the pair with the fastest batch search is kept. Each setting is
    measured once (about 20 settings in all), so tuning costs seconds.
    """
    t0 = time.perf_counter()
    truth = drop_self(gt_ids, self_ids, k)
    t = Tuning(target_recall=target, queries=len(queries), held_out=held_out)
    space = space if len(queries) else []
    cache: dict[tuple[tuple[str, int], ...], tuple[float, np.ndarray]] = {}
    extra = 0 if held_out else GT_EXTRA

    def at(params: dict[str, int]) -> tuple[float, np.ndarray]:
        key = tuple(sorted(params.items()))
        if key not in cache:
            set_params(index, params)
            cache[key] = measure(index, queries, self_ids, truth, k, extra)
            t.curve.append([dict(params), round(float(cache[key][1].mean()), 4)])
        return cache[key]

    if space:
        (main, values), rest = space[0], space[1:]
        log.info("tuning %s to recall@%d >= %s on %d queries", "/".join(n for n, _ in space), k, target, len(queries))
        generous = {name: vals[-1] for name, vals in rest}
        v = _smallest(lambda v: at({main: v, **generous})[1].mean(), values, target)
        per_query = at({main: v, **generous})[1]
        if per_query.mean() >= target:  # aim above the target by the measurement's own uncertainty
            t.margin = MARGIN_SE * float(per_query.std()) / np.sqrt(len(per_query))
        aim = min(1.0, target + t.margin)
        v = _smallest(lambda v: at({main: v, **generous})[1].mean(), values, aim)
        t.params = _fastest(index, queries, k, main, v, values, rest, at, aim) if rest else {main: v}
        set_params(index, t.params)
        t.recall_at_1, per_query = at(t.params)
        t.recall_at_10 = float(per_query.mean())
    elif len(queries):
        t.recall_at_1, per_query = measure(index, queries, self_ids, truth, k, extra)
        t.recall_at_10 = float(per_query.mean())
    t.target_reached = t.recall_at_10 >= target
    if not t.target_reached:
        log.warning("recall@%d target %.3f not reached: best %.4f with %s", k, target, t.recall_at_10, t.params)
    t.seconds = time.perf_counter() - t0
    t.latency_ms_p50, t.qps = speed(index, queries, k)
    return t


def _smallest(score: Callable[[int], float], values: list[int], target: float) -> int:
    """Smallest value in ``values`` whose ``score`` reaches ``target`` (doubling, then bisection); the largest value
    when none does. Assumes the score grows with the value, as recall does with nprobe/efSearch/k_factor."""
    lo_v, hi_v = values[0], values[-1]
    v = lo_v
    while score(v) < target and v < hi_v:
        v = min(hi_v, v * 2)
    if score(v) < target:
        return v
    lo, hi = max(lo_v, v // 2), v
    while lo < hi:
        mid = (lo + hi) // 2
        if score(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _fastest(index: Any, queries: np.ndarray, k: int, main: str, v: int, values: list[int],
             rest: list[tuple[str, list[int]]], at: Callable[[dict[str, int]], tuple[float, np.ndarray]], aim: float
             ) -> dict[str, int]:
    """With a refine stage: the smallest shortlist factor at ``v`` and at 1.5x and 2x ``v``; the fastest that reaches
    ``aim`` (timed on the whole query batch), else the setting with the best recall."""
    options = []
    for mv in sorted({v, min(values[-1], (3 * v + 1) // 2), min(values[-1], 2 * v)}):
        params = {main: mv}
        for name, vals in rest:
            others = {n: vs[-1] for n, vs in rest if n not in params}
            params[name] = _smallest(lambda s: at({**params, **others, name: s})[1].mean(), vals, aim)
        options.append(params)
    reached = [p for p in options if at(p)[1].mean() >= aim]
    if not reached:
        return max(options, key=lambda p: at(p)[1].mean())
    return min(reached, key=lambda p: batch_seconds(index, queries, k, p))


def batch_seconds(index: Any, queries: np.ndarray, k: int, params: dict[str, int]) -> float:
    """Seconds to search ``queries`` in one batch with ``params`` (the best of two runs)."""
    set_params(index, params)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        index.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return best


def speed(index: Any, queries: np.ndarray, k: int = TUNE_K, budget_s: float = 2.0) -> tuple[float, float]:
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
