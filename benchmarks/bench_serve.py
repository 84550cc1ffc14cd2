"""Benchmark `embedpipe serve` on loopback: QPS and p50/p99 latency of key, vector and image queries from 1, 8
and 32 concurrent clients, against the same searches in-process (``open_index().search`` / ``search_keys``)
and against one `embedpipe search` process per query.

The index holds ``--n`` vectors: real embeddings of a few hundred sample images (made with ``--model``, so
image queries embed with the same model) plus embedding-like padding (a mixture of Gaussians in 64 dims
mapped up, plus noise). The
service runs as its own process (`embedpipe serve --port 0`); clients are threads with keep-alive connections,
spread over a few processes so that the clients' Python does not share one interpreter lock. Every cell runs
for ``--seconds`` after a warm-up, so the whole run is bounded in time.

    .venv/bin/python benchmarks/bench_serve.py --json bench_serve.json            # 100k vectors, ~5-10 minutes
    .venv/bin/python benchmarks/bench_serve.py --quick                           # a small check that it works
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

KINDS = ("vector", "key", "image")
K = 10


# -- the data -------------------------------------------------------------------------------------------------

def prepare(root: Path, n: int, model: str, weights: str, input_size: int | None, kind: str,
            images: int = 256) -> tuple[Path, list[str], list[bytes]]:
    """Embed ``images`` sample JPEGs with the model, pad with random vectors to ``n``, index; returns
    (index dir, every key, the sample JPEGs)."""
    import tarfile

    from pipeline import embed, store
    from pipeline.index.build import run_index
    from pipeline.index.options import IndexConfig
    from pipeline.sample_data import write_sample_shards

    shards = write_sample_shards(root / "shards", "digits", shard_size=128, image_size=256, limit=images)
    embed([str(s) for s in shards], root / "emb", model=model, weights=weights, input_size=input_size, quiet=True)
    # The index reads a plain folder of Parquet files: the run's real embeddings plus padding (a run
    # folder's index reads only the files its done records vouch for, which the padding has none of).
    vectors = root / "vectors" / "embeddings"
    vectors.mkdir(parents=True)
    files = [Path(shutil.copy(f, vectors / f.name)) for f in store.list_shards(root / "emb")]
    meta = store.read_metadata(files[0])
    keys = [k for f in files for k in store.read_all(vectors, files=[f]).keys]
    rng = np.random.default_rng(0)
    # Embedding-like padding: a mixture of Gaussians in 64 dims mapped up, plus noise. Random unit vectors in
    # ~1000 dims have no neighbour structure at all: an approximate index then needs near-exhaustive search.
    dim = meta.dim
    lift = rng.normal(size=(64, dim)).astype(np.float32)
    centres, spread = rng.normal(size=(2000, 64)), rng.lognormal(-0.7, 0.6, 2000)
    left, s = n - len(keys), 0
    while left > 0:
        rows = min(50_000, left)
        c = rng.integers(0, len(centres), rows)
        x = ((centres[c] + spread[c, None] * rng.normal(size=(rows, 64))) @ lift).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        noise = rng.normal(size=(rows, dim)).astype(np.float32)
        x += 0.3 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        names = [f"synthetic{s:03d}_{i:06d}" for i in range(rows)]
        t = store.embedding_table(names, f"synthetic-{s:03d}.tar", range(rows), [None] * rows, x,
                                  dtype=meta.dtype, metadata=meta)
        store.write_table(vectors / f"synthetic-{s:03d}.parquet", t)
        keys += names
        left, s = left - rows, s + 1
    run_index(IndexConfig(str(vectors.parent), out=str(root / "index"), kind=kind))
    jpegs = []
    for shard in shards:
        with tarfile.open(shard) as tf:
            jpegs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return root / "index", keys, jpegs


# -- load generators ------------------------------------------------------------------------------------------

def hammer(call: Callable[[int], None], clients: int, seconds: float, warmup: float) -> tuple[int, list[float], int]:
    """``clients`` threads calling ``call(i)`` back to back; (calls in the window, their latencies, errors)."""
    start = time.perf_counter() + 0.05
    window = (start + warmup, start + warmup + seconds)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def run(c: int) -> None:
        i = c
        while True:
            t0 = time.perf_counter()
            if t0 >= window[1]:
                return
            try:
                call(i)
            except Exception:  # noqa: BLE001 - counted and reported; one failing query must not stop the bench
                errors[c] += 1
            t1 = time.perf_counter()
            if t0 >= window[0] and t1 <= window[1]:
                lat[c].append(t1 - t0)
            i += clients

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for part in lat for x in part]
    return len(flat), flat, sum(errors)


def http_client(base: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float, warmup: float,
                out: Any) -> None:
    """One client process: ``clients`` keep-alive connections posting ``bodies`` in turn (run via spawn)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conns: dict[int, http.client.HTTPConnection] = {}
    local = threading.local()

    def call(i: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            conns[id(local.conn)] = local.conn
        body, ctype = bodies[i % len(bodies)]
        local.conn.request("POST", "/search", body=body, headers={"content-type": ctype})
        r = local.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:200]!r}")

    out.put(hammer(call, clients, seconds, warmup))
    for c in conns.values():
        c.close()


def over_http(base: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float, warmup: float,
              procs: int) -> tuple[int, list[float], int]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    split = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    workers = [ctx.Process(target=http_client, args=(base, bodies, c, seconds, warmup, out)) for c in split if c]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + warmup + 300) for _ in workers]
    for w in workers:
        w.join()
    return sum(r[0] for r in results), [x for r in results for x in r[1]], sum(r[2] for r in results)


WRK_SCRIPT = r"""
local bodies = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/search", {["Content-Type"] = "application/json"}, bodies[(i % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.1f %.1f %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def over_wrk(base: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float, warmup: float,
             workdir: Path) -> dict[str, Any]:
    """``clients`` keep-alive connections from wrk (a C load generator: the clients' own CPU stays small on a
    machine the service shares), posting the JSON ``bodies`` in turn; a warm-up run first."""
    script, lines = workdir / "wrk.lua", workdir / "wrk-bodies.jsonl"
    script.write_text(WRK_SCRIPT)
    lines.write_bytes(b"\n".join(body for body, _ in bodies) + b"\n")
    env = {**os.environ, "BENCH_BODIES": str(lines)}
    cmd = ["wrk", "-t", str(min(clients, 2)), "-c", str(clients), "-s", str(script), "--latency", "--timeout", "30s", base]
    subprocess.run([*cmd, "-d", f"{max(1, round(warmup))}s"], env=env, check=True, capture_output=True)
    out = subprocess.run([*cmd, "-d", f"{round(seconds)}s"], env=env, check=True, capture_output=True, text=True)
    n, us, p50, p99, errors = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+)", out.stdout).groups()
    return {"qps": round(int(n) / (int(us) / 1e6), 1), "p50_ms": round(float(p50) / 1000, 2),
            "p99_ms": round(float(p99) / 1000, 2), "errors": int(errors)}


def row(mode: str, kind: str, clients: int, seconds: float, n: int, lat: list[float], errors: int,
        **extra: Any) -> dict[str, Any]:
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    r = {"mode": mode, "query": kind, "clients": clients, "qps": round(n / seconds, 1),
         "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
         "errors": errors, **extra}
    logging.info("%s", r)
    return r


# -- the service and the CLI ------------------------------------------------------------------------------------

def start_service(index: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"bench={index}", "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("embedpipe serve exited before serving")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining its log
    return proc, re.search(r"http://[\d.]+:\d+", line).group(0)


def health(base: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/healthz", timeout=60) as r:
        return json.loads(r.read())


def multipart(jpeg: bytes, k: int) -> tuple[bytes, str]:
    b = "benchboundary7f3a"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{k}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def cli_per_query(index: Path, query: list[str], runs: int) -> dict[str, Any]:
    """Wall time of whole `embedpipe search` processes (each loads the index, and for images the model)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "search", str(index), *query, "-k", str(K)],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return {"mode": "CLI process", "query": "image" if "--image" in query else "key", "clients": 1,
            "qps": round(1 / float(np.mean(times)), 3), "p50_ms": round(float(np.median(times)) * 1000, 1),
            "p99_ms": round(max(times) * 1000, 1), "errors": 0}


# -- the run ----------------------------------------------------------------------------------------------------

def in_process(index: Path, qkeys: list[str], a: argparse.Namespace) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``open_index().search`` and ``search_keys`` from threads in this process: what the service is measured
    against. Returns the query vectors (stored vectors of the first 500 query keys) and the rows."""
    from pipeline import open_index

    idx = open_index(index)
    idx.cache_lookups(vector_bytes=a.cache_mb << 20)  # the service does the same
    qvecs = idx.vectors(idx.lookup(qkeys[:500]))
    rows = []
    for c in a.clients:
        n, lat, err = hammer(lambda i: idx.search(qvecs[i % len(qvecs)], K), c, a.seconds, a.warmup)
        rows.append(row("in-process", "vector", c, a.seconds, n, lat, err))
        n, lat, err = hammer(lambda i: idx.search_keys([qkeys[i % len(qkeys)]], K), c, a.seconds, a.warmup)
        rows.append(row("in-process", "key", c, a.seconds, n, lat, err))
    return qvecs, rows


def bench(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    index, keys, jpegs = prepare(workdir, a.n, a.model, a.weights, a.input_size, a.kind)
    logging.info("prepared %d vectors in %.0fs", a.n, time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    qkeys = [keys[i] for i in rng.choice(len(keys), 2000, replace=False)]
    qvecs, rows = in_process(index, qkeys, a)  # the index is let go before the service loads its own copy
    proc, base = start_service(index, ["--cache-mb", str(a.cache_mb), "--batch-wait-ms", str(a.batch_wait_ms),
                                       "--workers", str(a.workers)])
    try:
        bodies = {
            "vector": [(json.dumps({"vectors": [v.tolist()], "k": K}).encode(), "application/json") for v in qvecs],
            "key": [(json.dumps({"keys": [k], "k": K}).encode(), "application/json") for k in qkeys],
            "image": [multipart(j, K) for j in jpegs],
        }
        over_http(base, bodies["image"][:1], 1, 0.5, 0.0, 1)  # builds the model (first image query)
        for kind in a.queries:
            for c in a.clients:
                if a.client == "wrk" and kind != "image":
                    r = {"mode": "service", "query": kind, "clients": c, **over_wrk(base, bodies[kind], c, a.seconds,
                                                                                     a.warmup, workdir)}
                    logging.info("%s", r)
                    rows.append(r)
                    continue
                before = health(base)["image_queries"]
                n, lat, err = over_http(base, bodies[kind], c, a.seconds, a.warmup, min(c, a.client_procs))
                after = health(base)["image_queries"]
                extra = {}
                if kind == "image":
                    batches = after["batches"] - before["batches"]
                    extra["mean_batch"] = round((after["images"] - before["images"]) / batches, 2) if batches else None
                rows.append(row("service", kind, c, a.seconds, n, lat, err, **extra))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    if a.cli_runs > 0:
        rows.append(cli_per_query(index, [qkeys[0]], a.cli_runs))
    if a.cli_runs > 0 and "image" in a.queries:
        (workdir / "q.jpg").write_bytes(jpegs[0])
        rows.append(cli_per_query(index, ["--image", str(workdir / "q.jpg")], max(1, a.cli_runs // 2)))
    from pipeline.index.layout import read_record

    rec = read_record(index)
    return {"n": a.n, "model": a.model, "factory": rec.factory, "search_params": dict(rec.search_params),
            "workers": a.workers, "client": a.client, "seconds": a.seconds, "cores": os.cpu_count(), "rows": rows,
            "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Service QPS over in-process QPS at the same concurrency (the issue's floor: >= 0.5 at 8 clients)."""
    qps = {(r["mode"], r["query"], r["clients"]): r["qps"] for r in rows}
    return {f"{kind}@{c}": round(qps[("service", kind, c)] / qps[("in-process", kind, c)], 3)
            for (mode, kind, c) in qps if mode == "service" and ("in-process", kind, c) in qps
            and qps[("in-process", kind, c)] > 0}


def table(report: dict[str, Any]) -> str:
    head = f"{'mode':<12} {'query':<7} {'clients':>7} {'QPS':>10} {'p50 ms':>9} {'p99 ms':>9} {'batch':>6} {'err':>4}"
    lines = [f"index: {report['n']} vectors, {report['factory']} {report['search_params']}, model {report['model']}, "
             f"{report['cores']} cores, {report['workers']} service process(es), {report.get('client', 'python')} "
             f"clients for keys/vectors, {report['seconds']}s per cell", head]
    for r in report["rows"]:
        lines.append(f"{r['mode']:<12} {r['query']:<7} {r['clients']:>7} {r['qps']:>10} {r['p50_ms']:>9} "
                     f"{r['p99_ms']:>9} {r.get('mean_batch') or '':>6} {r['errors']:>4}")
    lines.append("service / in-process QPS: " + ", ".join(f"{k} {v}" for k, v in report["ratios"].items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--queries", default=",".join(KINDS), help=f"query kinds: {', '.join(KINDS)}")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell (after --warmup)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--model", default="default", help="the model that embeds the sample images and image queries")
    p.add_argument("--weights", default="default")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--kind", default="auto", help="index kind (as `embedpipe index --kind`)")
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1, help="`embedpipe serve --workers` (processes of the service)")
    p.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    p.add_argument("--client", choices=("python", "wrk"), default="python",
                   help="key/vector load from Python threads, or from wrk (apt install wrk: a C client, so the "
                        "clients take little of the CPU the service shares on a small machine)")
    p.add_argument("--cli-runs", type=int, default=3, help="`embedpipe search` processes timed per query kind (0: none)")
    p.add_argument("--quick", action="store_true", help="20k vectors, 2 s cells, 1 and 8 clients, tiny model")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temporary folder)")
    a = p.parse_args()
    if a.quick:
        a.n, a.seconds, a.warmup, a.clients, a.cli_runs = min(a.n, 20_000), 2.0, 0.5, "1,8", 2
        if a.model == "default":
            a.model, a.weights, a.input_size = "torchvision:resnet18", "none", 64
    a.clients = [int(c) for c in a.clients.split(",")]
    a.queries = [q for q in a.queries.split(",") if q]
    bad = set(a.queries) - set(KINDS)
    if bad:
        p.error(f"--queries: unknown kinds {sorted(bad)}; use {', '.join(KINDS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        report = bench(a, a.workdir or Path(tmp))
    print(table(report))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
