"""Synthetic labelled embedding shards (real Parquet files in the store schema) for probe and k-NN tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.records import EmbeddingMeta, ModelIdentity


def blobs(n: int = 600, d: int = 32, c: int = 4, spread: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters: well separated when ``spread`` is small against the centre distance (~6)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * (6.0 / np.sqrt(2 * d))
    y = rng.integers(0, c, n)
    return (centers[y] + spread * rng.normal(size=(n, d)) / np.sqrt(d) * 3).astype(np.float32), y


def write_shards(out: Path, x: np.ndarray, y: np.ndarray, shards: int = 3, labels: bool = True,
                 names: list[str] | None = None, metadata: dict | None = None, prefix: str = "k") -> Path:
    """Write rows round-robin into ``shards`` Parquet files under ``out/embeddings``; ``json`` holds {"name": ...}."""
    for s in range(shards):
        idx = np.arange(s, len(y), shards)
        keys = [f"{prefix}{i:06d}" for i in idx]
        js = [json.dumps({"name": names[v] if names else f"c{v}", "i": int(i)}) for v, i in zip(y[idx], idx)]
        t = store.embedding_table(
            keys, f"shard-{s:03d}", list(range(len(idx))), y[idx].tolist() if labels else [None] * len(idx),
            x[idx], dtype="float32", extra={"json": js},
            metadata=EmbeddingMeta(ModelIdentity(**{"model": "test:blobs", **(metadata or {})}), x.shape[1],
                                   "float32", normalize=False),
        )
        store.write_table(out / "embeddings" / f"shard-{s:03d}.parquet", t)
    return out
