"""Embedding-like synthetic vectors, for the index benchmark and the index tests.

Real image embeddings are unit vectors of low intrinsic dimension spread over a long-tailed mixture of
overlapping modes, not well-separated clusters (on which any IVF reaches recall 0.98 at ``nprobe=1`` and
hides what an index really costs). ``EmbeddingLike`` draws ``normalize(A @ z + noise)``: ``z`` from a mixture
of thousands of Gaussians in ``latent`` dims whose means and spreads follow a decaying spectrum, with
Zipf-like component weights and log-normal (broad, long-tailed) component scales; ``A`` a fixed random map to
``dim``; ``noise`` isotropic, ``noise`` times the signal's size. Every draw with another seed is a fresh set
from the same distribution: queries that are not in the index.

Example:
    >>> gen = EmbeddingLike(dim=64, components=100)
    >>> x, q = gen.sample(1000, seed=1), gen.sample(10, seed=2)  # data and fresh queries
    >>> x.shape, q.dtype
    ((1000, 64), dtype('float32'))
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .. import store
from ..records import EmbeddingMeta, ModelIdentity
from ..version import __version__

# The identity of vectors this module makes: no network made them, but every reader of shards expects one.
IDENTITY = ModelIdentity("synthetic:embedding-like", "0" * 64, "pool", {"input_size": 64})


@dataclass(frozen=True)
class EmbeddingLike:
    """A fixed distribution of embedding-like unit vectors (the world is drawn from ``seed``)."""

    dim: int = 512
    latent: int = 64
    components: int = 4000
    noise: float = 0.3
    spread: float = 0.6  # median within-component scale, relative to the spread of the means
    seed: int = 0

    @cached_property
    def _world(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        spectrum = 1 / np.sqrt(1 + np.arange(self.latent))  # a decaying spectrum, as real embeddings have
        weights = 1 / (1 + np.arange(self.components)) ** 0.8  # a few common modes, a long tail of rare ones
        return {
            "spectrum": spectrum,
            "means": rng.normal(size=(self.components, self.latent)) * spectrum,
            "scales": self.spread * rng.lognormal(0, 0.6, self.components),
            "cdf": np.cumsum(weights / weights.sum()),
            "map": (rng.normal(size=(self.latent, self.dim)) / np.sqrt(self.latent)).astype(np.float32),
            "noise": np.float32(self.noise * np.sqrt((spectrum ** 2).sum() / self.dim)),
        }

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        """``n`` unit vectors (float32 ``[n, dim]``); another ``seed`` gives a fresh draw."""
        w = self._world
        rng = np.random.default_rng([self.seed, 1, seed])
        out = np.empty((n, self.dim), np.float32)
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            comp = np.minimum(np.searchsorted(w["cdf"], rng.random(m)), self.components - 1)
            z = w["means"][comp] + w["scales"][comp, None] * rng.normal(size=(m, self.latent)) * w["spectrum"]
            x = z.astype(np.float32) @ w["map"]
            x += w["noise"] * rng.standard_normal((m, self.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[lo:lo + m] = x
        return out


def write_shards(root: str | Path, x: np.ndarray, shards: int = 3, dtype: str = "float32", prefix: str = "shard",
                 first: int = 0, identity: ModelIdentity | None = None) -> list[Path]:
    """Split ``x`` into ``shards`` files ``root/embeddings/<prefix>-NNNNNN.parquet``; keys ``<prefix>-NNNNNN_IIIII``."""
    meta = EmbeddingMeta(identity or IDENTITY, x.shape[1], dtype, version=__version__)
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
