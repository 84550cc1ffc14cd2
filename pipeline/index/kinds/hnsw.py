"""``hnsw``: an HNSW graph over float32 vectors (in an id map); a query walks ``efSearch`` candidates."""
from __future__ import annotations

from . import IDMAP_BYTES, IDS, Choice, KindSpec, Knob

HNSW_M = 32
EF_SEARCH = Knob("efSearch", range(16, 4097))


def estimate(n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    return n * (dim * 4 + 8 * HNSW_M + 16 + IDMAP_BYTES)


def choose(n: int, dim: int, budget: int, parts: bool) -> Choice:
    est = estimate(n, dim)
    return Choice("hnsw", f"{IDS}HNSW{HNSW_M},Flat", f"{n} vectors: HNSW graph, {est / 1e9:.2f} GB",
                  estimated_bytes=est)


def knobs(factory: str) -> tuple[Knob, ...]:
    return (EF_SEARCH,)


SPEC = KindSpec("hnsw", choose, estimate, knobs=knobs, auto=2)
