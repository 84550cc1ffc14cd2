"""Peak resident memory (VmHWM) of `embedpipe embed` on one 10 000-sample shard and `embedpipe index` on 1M vectors.

Each step runs as its own `python -m pipeline` process, so the number is that process's own peak.

    .venv/bin/python benchmarks/bench_memory.py [--samples 10000] [--vectors 1000000] [--json mem.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import store


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run ``python -m pipeline ARGS`` and poll its VmHWM (peak RSS); returns (MB, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return peak / 1024, time.time() - t0


def write_shard(path: Path, n: int, size: int = 128) -> None:
    rng = np.random.default_rng(0)
    base = (np.linspace(0, 255, size * size * 3).reshape(size, size, 3)).astype(np.uint8)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            img = np.roll(base, int(rng.integers(0, size)), axis=int(rng.integers(0, 2)))
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=85)
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_vectors(emb: Path, n: int, dim: int = 512, per_shard: int = 100_000) -> None:
    """Clustered unit vectors, as real embeddings are (uniform noise on a 512-d sphere has no neighbours
    worth the name, and tuning an IVF index on it degenerates into near-exhaustive search)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, dim)).astype(np.float32)
    for s in range(0, n, per_shard):
        m = min(per_shard, n - s)
        x = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        table = store.embedding_table([f"v{s + i:08d}" for i in range(m)], f"part-{s // per_shard}", range(m),
                                      [None] * m, x, "float16", metadata={"dim": dim, "dtype": "float16"})
        store.write_table(emb / "embeddings" / f"part-{s // per_shard:04d}.parquet", table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="embedpipe-mem-"))
    rows = {}
    if args.samples:
        write_shard(tmp / "big-000000.tar", args.samples)
        mb, s = peak_rss_mb(["embed", str(tmp / "big-000000.tar"), "--out", str(tmp / "emb"), "--model",
                             "torchvision:resnet18", "--weights", "none", "--input-size", "64", "-q"])
        rows["embed_one_shard"] = {"samples": args.samples, "peak_rss_mb": round(mb), "seconds": round(s, 1),
                                   "setup": "resnet18 random weights, 128px JPEGs, 64px input, TorchScript fp32"}
    if args.vectors:
        write_vectors(tmp / "vec", args.vectors)
        mb, s = peak_rss_mb(["index", str(tmp / "vec"), "--out", str(tmp / "idx"), "--kind", "ivf"])
        raw = args.vectors * 512 * 4 / 2**20
        rows["index_ivf"] = {"vectors": args.vectors, "dim": 512, "peak_rss_mb": round(mb), "seconds": round(s, 1),
                             "float32_vectors_mb": round(raw)}
    for name, r in rows.items():
        print(name, r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # ~3 GB of shards, embeddings and index


if __name__ == "__main__":
    os.environ.setdefault("EMBEDPIPE_CACHE", tempfile.mkdtemp(prefix="embedpipe-cache-"))
    main()
