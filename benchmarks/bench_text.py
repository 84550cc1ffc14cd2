"""Benchmark text queries of an image-text model: the recall of text queries that `embedpipe index` records for
an index of ``--n`` vectors, and the cost per text query in `embedpipe serve` next to an image query's, measured
in one run against one service process.

The index is built as ``bench_serve.py`` builds its own: real embeddings of 256 sample JPEGs made with
``--model`` (an ``open_clip:`` model, so the service can embed both kinds of query) plus embedding-like padding
up to ``--n``, the kind chosen by ``--kind`` (auto by default). One client on a keep-alive connection then sends
a text query and an image query in turn (``--rounds`` of each) and times each request from send to answer.

    .venv/bin/python benchmarks/bench_text.py --json benchmarks/bench_text_results.json   # 100k, ViT-B-32 (random)
    .venv/bin/python benchmarks/bench_text.py --n 20000 --rounds 20                        # a quick check
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import K, health, prepare, start_service  # noqa: E402


def timed(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(ms from sending ``body`` to the whole answer, the answer)."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/search", body=data, headers={"content-type": "application/json"})
    r = conn.getresponse()
    out = r.read()
    ms = (time.perf_counter() - t0) * 1000
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {out[:300]!r}")
    return ms, json.loads(out)


def bench(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from pipeline.index.layout import read_record
    from pipeline.index.text_recall import DEFAULT_TEXTS

    t0 = time.perf_counter()
    index, _, jpegs = prepare(workdir, a.n, a.model, a.weights, None, a.kind)
    built_s = time.perf_counter() - t0
    rec = read_record(index)
    logging.info("index: %s, %d vectors, image recall@10 %.4f, text queries %s", rec.factory, rec.count,
                 rec.recall_at_10, rec.text_queries)
    proc, base = start_service(index, ["--batch-wait-ms", str(a.batch_wait_ms)])
    try:
        u = urlsplit(base)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        images = [base64.b64encode(j).decode() for j in jpegs]
        timed(conn, {"texts": [DEFAULT_TEXTS[0]], "k": K})  # builds the text tower
        timed(conn, {"images": [images[0]], "k": K})  # builds the image tower
        lat: dict[str, list[float]] = {"text": [], "image": []}
        took: dict[str, list[float]] = {"text": [], "image": []}
        for i in range(a.rounds):  # in turn, so that both kinds meet the same load on the shared cores
            for kind, body in (("text", {"texts": [DEFAULT_TEXTS[(i + 1) % len(DEFAULT_TEXTS)]], "k": K}),
                               ("image", {"images": [images[(i + 1) % len(images)]], "k": K})):
                ms, answer = timed(conn, body)
                lat[kind].append(ms)
                took[kind].append(answer["took_ms"])
        stats = health(base)
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    rows = {kind: {"p50_ms": round(float(np.median(v)), 2), "p90_ms": round(float(np.percentile(v, 90)), 2),
                   "service_took_p50_ms": round(float(np.median(took[kind])), 2), "queries": len(v)}
            for kind, v in lat.items()}
    return {"n": rec.count, "model": a.model, "weights": a.weights, "factory": rec.factory,
            "search_params": dict(rec.search_params), "image_rows_recall@10": rec.recall_at_10,
            "text_queries": rec.text_queries, "batch_wait_ms": a.batch_wait_ms, "cores": os.cpu_count(),
            "prepare_seconds": round(built_s, 1), "per_query": rows, "text_batches": stats["text_queries"],
            "image_batches": stats["image_queries"]}


def table(r: dict[str, Any]) -> str:
    tq = r["text_queries"] or {}
    lines = [f"index: {r['n']} vectors, {r['factory']} {r['search_params']}, model {r['model']} (weights "
             f"{r['weights']}), {r['cores']} cores",
             f"recall@10: image rows {r['image_rows_recall@10']:.4f}, text queries {tq.get('recall@10')} "
             f"({tq.get('queries')} {tq.get('texts')}; for the target: {tq.get('for_target')})",
             f"{'query':<7} {'p50 ms':>8} {'p90 ms':>8} {'service took p50 ms':>20} {'n':>5}"]
    for kind, row in r["per_query"].items():
        lines.append(f"{kind:<7} {row['p50_ms']:>8} {row['p90_ms']:>8} {row['service_took_p50_ms']:>20} "
                     f"{row['queries']:>5}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    p.add_argument("--model", default="open_clip:ViT-B-32", help="an open_clip: model (both towers)")
    p.add_argument("--weights", default="none", help="none: random weights (offline); a tag in --model: its own")
    p.add_argument("--kind", default="auto", help="index kind (as `embedpipe index --kind`)")
    p.add_argument("--rounds", type=int, default=100, help="text queries and image queries timed, each")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="`embedpipe serve --batch-wait-ms`")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temporary folder)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        report = bench(a, a.workdir or Path(tmp))
    print(table(report))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
