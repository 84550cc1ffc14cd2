"""Helpers for the index/search tests: clustered synthetic embeddings written as real Parquet shards."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store

META = {"model": "synthetic:clusters", "weights_sha256": "0" * 64, "layer": "pool", "dim": None,
        "preprocess": {"input_size": 64}, "normalize": True, "version": "0.1.0"}


def clustered(n: int, dim: int = 32, centers: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors drawn around ``centers`` random cluster centres (float32 [n, dim])."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shards(root: Path, x: np.ndarray, shards: int = 3, dtype: str = "float32", prefix: str = "shard",
                 first: int = 0, meta: dict[str, Any] | None = None) -> list[Path]:
    """Split ``x`` into ``shards`` files ``root/embeddings/<prefix>-NNNNNN.parquet``; keys ``<prefix>NNNNNN_IIIII``."""
    meta = {**META, "dim": x.shape[1], "dtype": dtype, **(meta or {})}
    paths = []
    for s, part in enumerate(np.array_split(x, shards)):
        name = f"{prefix}-{first + s:06d}"
        keys = [f"{name}_{i:05d}" for i in range(len(part))]
        table = store.embedding_table(keys, f"{name}.tar", range(len(part)), [None] * len(part), part, dtype=dtype,
                                      metadata=meta)
        path = Path(root) / "embeddings" / f"{name}.parquet"
        store.write_table(path, table)
        paths.append(path)
    return paths


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN with numpy: (scores, ids) [nq, k], best first."""
    s = q @ x.T if metric == "ip" else -((q[:, None, :] - x[None]) ** 2).sum(-1)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))
