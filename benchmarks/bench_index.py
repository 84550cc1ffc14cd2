"""Benchmark `embedpipe index` on embedding-like vectors: each kind and `auto` against exact search and autofaiss.

The vectors come from ``pipeline.index.synthetic.EmbeddingLike`` (dim 512, unit-normalised, low intrinsic dimension,
a long-tailed mixture of overlapping modes: recall is hard the way it is on real embeddings), written as float16
Parquet shards. 1,000 fresh queries (another draw: in no index) measure every recall. Per size, in this one process:
exact search (FAISS ``IndexFlatIP`` over the same vectors), then each kind built by ``embedpipe index --kind K`` in a
child process (its wall time and peak RSS) and opened with ``open_index``: batch QPS (the 1,000 queries in one call,
best of 3), single-query p50/p99 through the API (and how much of p50 is outside FAISS), fresh-query recall@10 and
the recall ``index.json`` recorded. autofaiss's default index (``build_index`` with only the data given) is built and
measured the same way when ``--autofaiss-python`` names an interpreter that has it (or this one imports it).

    flock /tmp/embedpipe-timing.lock .venv/bin/python benchmarks/bench_index.py --sizes 100000,1000000 \\
        --autofaiss-python /tmp/af/bin/python --json benchmarks/bench_index_results.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import open_index
from pipeline.index.synthetic import EmbeddingLike, write_shards

DIM, K, SHARD_ROWS = 512, 10, 100_000
AUTOFAISS = """
import json, sys
from autofaiss import build_index
build_index(embeddings=sys.argv[1], file_format="parquet", embedding_column_name="embedding",
            index_path=sys.argv[2], index_infos_path=sys.argv[3])
"""


def write_data(root: Path, n: int, gen: EmbeddingLike) -> Any:
    """Write ``n`` vectors as float16 shards; returns an exact ``IndexFlatIP`` over the same (float16) values."""
    import faiss

    flat = faiss.IndexFlatIP(DIM)
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        x = gen.sample(min(SHARD_ROWS, n - start), seed=1000 + s).astype(np.float16)
        write_shards(root, x, shards=1, dtype="float16", prefix="b", first=s)
        flat.add(x.astype(np.float32))
    return flat


def child(cmd: list[str], log_path: Path) -> tuple[float, float]:
    """Run ``cmd``; returns its wall seconds and peak RSS in GB (VmHWM, polled: ``wait4``'s ``ru_maxrss`` would
    report this process's size when the child never grows past it). Raises with the log's tail if it fails."""
    t0 = time.perf_counter()
    peak_kb = 0
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{log_path.read_text()[-3000:]}")
    return wall, peak_kb * 1024 / 1e9


def latencies(one: Callable[[np.ndarray], Any], q: np.ndarray) -> np.ndarray:
    """Seconds of ``one(v)`` for each query ``v`` of ``q``, one by one."""
    lat = []
    for v in q:
        t0 = time.perf_counter()
        one(v)
        lat.append(time.perf_counter() - t0)
    return np.array(lat)


def speed(one: Callable[[np.ndarray], Any], batch: Callable[[np.ndarray], np.ndarray], q: np.ndarray, singles: int
          ) -> dict[str, Any]:
    """Batch QPS (all of ``q`` in one call, best of 3), single-query p50/p99 over ``singles`` queries, the batch ids."""
    best, ids = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        ids = batch(q)
        best = min(best, time.perf_counter() - t0)
    lat = latencies(one, q[:singles])
    return {"qps": len(q) / best, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "ids": ids}


def api_overhead_us(idx: Any, q: np.ndarray) -> float:
    """The per-query cost outside FAISS: median latency of ``idx.search`` minus that of FAISS's own search, the two
    timed on each query in turn, first one then the other by turns (the second run of a query finds warmer caches),
    after an untimed run of it."""
    api, raw = (lambda v: idx.search(v, K)), (lambda v: idx.index.search(v[None], K))
    t_api, t_raw = [], []
    for i, v in enumerate(q[:, None]):
        latencies(raw, v)
        for f in ((api, raw) if i % 2 else (raw, api)):
            (t_api if f is api else t_raw).append(latencies(f, v)[0])
    return round(float(np.median(t_api) - np.median(t_raw)) * 1e6, 1)


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[:K], t[:K])) / K for f, t in zip(found, truth)]))


def row(n: int, kind: str, factory: str, params: str, build: tuple[float, float] | None, s: dict[str, Any],
        truth: np.ndarray, exact: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"n": n, "kind": kind, "factory": factory, "params": params or "-",
            "build_s": round(build[0], 1) if build else "-", "peak_GB": round(build[1], 2) if build else "-",
            "batch_qps": round(s["qps"]), "x_exact_batch": round(s["qps"] / exact["qps"], 1),
            "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3),
            "x_exact_p50": round(exact["p50_ms"] / s["p50_ms"], 1), "recall@10": round(recall10(s["ids"], truth), 4),
            **extra}


def bench_size(n: int, kinds: list[str], args: argparse.Namespace, work: Path, done: list[dict]) -> list[dict]:
    """Rows for one size; each is logged and saved (``--json``) as soon as it is measured."""
    gen = EmbeddingLike(dim=DIM, seed=args.seed)
    root = work / f"emb-{n}"
    t0 = time.perf_counter()
    flat = write_data(root, n, gen)
    q = gen.sample(args.queries, seed=1)  # fresh: no shard is drawn with this seed
    logging.info("wrote %d vectors in %.1fs", n, time.perf_counter() - t0)
    exact = speed(lambda v: flat.search(v[None], K), lambda b: flat.search(b, K)[1], q, args.exact_singles)
    truth = exact["ids"]
    rows = [row(n, "exact", "IndexFlatIP (FAISS)", "", None, exact, truth, exact, tuned_recall="-", api_us="-")]

    def save(r: dict[str, Any]) -> None:
        rows.append(r)
        logging.info("%s", r)
        if args.json:
            Path(args.json).write_text(json.dumps({"note": args.note, "rows": done + rows}, indent=2))

    for kind in kinds:
        out = work / f"idx-{n}-{kind}"
        build = child([sys.executable, "-m", "pipeline", "index", str(root), "--out", str(out), "--kind", kind,
                       "--target-recall", str(args.target_recall), "--memory", args.memory, "-q"],
                      work / f"{kind}-{n}.log")
        idx = open_index(out)
        s = speed(lambda v: idx.search(v, K), lambda b: idx.search(b, K).ids, q, args.singles)
        rec = idx.record
        save(row(n, kind, rec.factory, ",".join(f"{a}={b}" for a, b in rec.search_params.items()), build, s,
                 truth, exact, tuned_recall=rec.recall_at_10, api_us=api_overhead_us(idx, q[:args.singles]),
                 **({"auto": dict(rec.auto)} if rec.auto else {})))
        idx = None  # frees the index before the next build
        shutil.rmtree(out)
    if args.autofaiss_python:
        save(bench_autofaiss(n, root, work, q, truth, exact, args))
    flat = None  # frees the exact index before the next size
    shutil.rmtree(root)
    return rows


def bench_autofaiss(n: int, root: Path, work: Path, q: np.ndarray, truth: np.ndarray, exact: dict[str, Any],
                    args: argparse.Namespace) -> dict[str, Any]:
    """autofaiss's ``build_index`` with its defaults (only the data and the column named), measured like ours."""
    import faiss

    out, infos = work / f"autofaiss-{n}.index", work / f"autofaiss-{n}.json"
    build = child([args.autofaiss_python, "-c", AUTOFAISS, str(root / "embeddings"), str(out), str(infos)],
                  work / f"autofaiss-{n}.log")
    index = faiss.read_index(str(out))
    info = json.loads(infos.read_text())
    params = info.get("index_param", "")
    if params:
        ps = faiss.ParameterSpace()
        for p in params.split(","):
            name, value = p.split("=")
            ps.set_index_parameter(index, name, float(value))
    s = speed(lambda v: index.search(v[None], K), lambda b: index.search(b, K)[1], q, args.singles)
    out.unlink()
    return row(n, "autofaiss", info.get("index_key", "?"), params, build, s, truth, exact, tuned_recall="-",
               api_us="-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="auto,fastscan,hnsw,ivf,ivfpq")
    ap.add_argument("--queries", type=int, default=1000, help="Fresh queries (one batch call).")
    ap.add_argument("--singles", type=int, default=300, help="Queries timed one by one per index.")
    ap.add_argument("--exact-singles", type=int, default=30, help="Queries timed one by one for exact search.")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--memory", default="8GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autofaiss-python", default=None,
                    help="A Python with autofaiss installed (it pins numpy<2, so it lives in its own venv).")
    ap.add_argument("--note", default="", help="Stored with the JSON rows (machine, load...).")
    ap.add_argument("--json", default=None, help="Also write the rows as JSON here.")
    ap.add_argument("--workdir", default=None, help="Scratch folder (default: a temp dir).")
    args = ap.parse_args()
    if args.autofaiss_python is None and importlib.util.find_spec("autofaiss") is not None:
        args.autofaiss_python = sys.executable
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    rows: list[dict] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += bench_size(n, args.kinds.split(","), args, work, rows)
    head = ["n", "kind", "factory", "params", "build_s", "peak_GB", "batch_qps", "x_exact_batch", "p50_ms", "p99_ms",
            "x_exact_p50", "api_us", "recall@10", "tuned_recall"]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        if "auto" in r:
            print(f"auto at {r['n']}: {r['auto'].get('why', '')}")


if __name__ == "__main__":
    main()
