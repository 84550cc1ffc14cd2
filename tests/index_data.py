"""Helpers for the index/search tests: synthetic embeddings written as real Parquet shards.

``embedding_like`` draws from ``pipeline.index.synthetic.EmbeddingLike`` (the generator ``benchmarks/bench_index.py``
uses: low intrinsic dimension, a long-tailed mixture of overlapping modes), where recall is hard the way it is on
real embeddings; ``clustered`` draws well-separated clusters, for tests about anything but recall.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.index import synthetic
from pipeline.records import EmbeddingMeta, ModelIdentity

IDENTITY = ModelIdentity("synthetic:clusters", "0" * 64, "pool", {"input_size": 64})


def meta(dim: int, dtype: str = "float32", **identity: Any) -> EmbeddingMeta:
    """Embedding metadata of the tests' model (``identity`` overrides fields of its identity)."""
    return EmbeddingMeta(replace(IDENTITY, **identity), dim, dtype, version="0.1.0")


def clustered(n: int, dim: int = 32, centers: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors drawn around ``centers`` random cluster centres (float32 [n, dim])."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embedding_like(n: int, dim: int = 32, seed: int = 0, components: int = 200) -> np.ndarray:
    """``n`` embedding-like unit vectors (float32 [n, dim]); another ``seed`` draws fresh queries of the same set."""
    return synthetic.EmbeddingLike(dim=dim, latent=min(64, dim), components=components).sample(n, seed)


def write_shards(root: Path, x: np.ndarray, shards: int = 3, dtype: str = "float32", prefix: str = "shard",
                 first: int = 0, meta: dict[str, Any] | None = None) -> list[Path]:
    """``synthetic.write_shards`` with the tests' model metadata (keys ``<prefix>-NNNNNN_IIIII``)."""
    return synthetic.write_shards(root, x, shards, dtype, prefix, first, replace(IDENTITY, **(meta or {})))


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN with numpy: (scores, ids) [nq, k], best first."""
    s = q @ x.T if metric == "ip" else -((q[:, None, :] - x[None]) ** 2).sum(-1)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth)]))
