"""Benchmark `embedpipe index`: build time, QPS and recall@10 of each index kind vs exact search.

Clustered synthetic unit vectors of dim 512 are written as real float16 Parquet shards, indexed with
``run_index`` (auto choice off: each kind explicitly, tuned to --target-recall), then queried with fresh points
from the same distribution (not in the index) whose exact top-10 comes from brute-force search.

    .venv/bin/python benchmarks/bench_index.py --sizes 100000,1000000 --json bench_index.json
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import open_index, store
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig

DIM = 512


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray, spread: float = 0.6) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_data(root: Path, n: int, seed: int, shard_rows: int = 100_000) -> np.ndarray:
    """Write n vectors in shards of ``shard_rows``; returns the centres (to draw queries from)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(100, n // 1000), DIM)).astype(np.float32) / np.sqrt(DIM)
    for s, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        x = clustered(rows, DIM, rng, centers)
        keys = [f"b{s:04d}_{i:06d}" for i in range(rows)]
        t = store.embedding_table(keys, f"b{s:04d}.tar", range(rows), [None] * rows, x, dtype="float16",
                                  metadata={"model": "synthetic", "dim": DIM, "dtype": "float16"})
        store.write_table(root / "embeddings" / f"b{s:04d}.parquet", t)
    return centers


def exact(root: Path, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Brute-force top-k over the shards (streamed); returns ids and the exact-search QPS."""
    import faiss

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    t0, start = time.perf_counter(), 0
    for b in store.iter_batches(root, batch_size=100_000):
        d, i = faiss.knn(q, b.embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, i + start)
        start += len(b.keys)
    heap.finalize()
    return heap.I, len(q) / (time.perf_counter() - t0)


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[:10], t[:10])) / 10 for f, t in zip(found, truth)]))


def bench(n: int, kinds: list[str], nq: int, target: float, seed: int, workdir: Path, done: list[dict],
          save: Path | None = None) -> list[dict]:
    """Rows for one size; each row is appended to ``done`` (and ``save`` rewritten) as soon as it is measured."""
    root = workdir / f"emb-{n}"
    t0 = time.perf_counter()
    centers = write_data(root, n, seed)
    logging.info("wrote %d vectors in %.1fs", n, time.perf_counter() - t0)
    q = clustered(nq, DIM, np.random.default_rng(seed + 1), centers).astype(np.float16).astype(np.float32)
    truth, exact_qps = exact(root, q, 10)
    rows = [{"n": n, "kind": "exact (numpy/faiss brute force)", "factory": "-", "params": "-", "build_s": 0.0,
             "qps": round(exact_qps, 1), "recall@10": 1.0, "tuned_recall@10": 1.0}]
    for kind in kinds:
        out = workdir / f"idx-{n}-{kind}"
        t0 = time.perf_counter()
        res = run_index(IndexConfig(str(root), out=str(out), kind=kind, target_recall=target, queries=nq))
        build_s = time.perf_counter() - t0
        idx = open_index(out)
        t1 = time.perf_counter()
        found = idx.search(q, 10).ids
        qps = nq / (time.perf_counter() - t1)
        meta = res["meta"]
        rows.append({"n": n, "kind": kind, "factory": meta["factory"],
                     "params": ",".join(f"{a}={b}" for a, b in meta["search_params"].items()) or "-",
                     "build_s": round(build_s, 1), "qps": round(qps, 1), "recall@10": round(recall10(found, truth), 4),
                     "tuned_recall@10": meta["tuning"]["recall@10"], "latency_ms_p50": meta["tuning"]["latency_ms_p50"]})
        logging.info("%s", rows[-1])
        if save:
            save.write_text(json.dumps(done + rows, indent=2))
        del idx
        shutil.rmtree(out)
    shutil.rmtree(root)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="flat,ivf,ivfpq,hnsw")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="Also write the rows as JSON here.")
    ap.add_argument("--workdir", default=None, help="Scratch folder (default: a temp dir).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += bench(n, args.kinds.split(","), args.queries, args.target_recall, args.seed, work, rows,
                      Path(args.json) if args.json else None)
    head = ["n", "kind", "factory", "params", "build_s", "qps", "recall@10", "tuned_recall@10"]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
