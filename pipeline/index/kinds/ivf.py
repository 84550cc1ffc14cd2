"""``ivf``: IVF-Flat, √N inverted lists of float32 vectors; a query scans ``nprobe`` of them. Buildable in parts."""
from __future__ import annotations

from . import Choice, KindSpec, Knob, nlist_for, nprobe


def estimate(n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    return n * (dim * 4 + 8) + nlist * dim * 4


def train_size(n: int, nlist: int) -> int:
    return min(n, max(64 * nlist, 20_000))


def choose(n: int, dim: int, budget: int, parts: bool) -> Choice:
    nlist = nlist_for(n)
    est = estimate(n, dim, nlist)
    return Choice("ivf", f"IVF{nlist},Flat", f"{n} vectors: IVF with {nlist} ≈ √N lists, {est / 1e9:.2f} GB", nlist,
                  est, train_size(n, nlist))


def knobs(factory: str) -> tuple[Knob, ...]:
    return (nprobe(factory),)


SPEC = KindSpec("ivf", choose, estimate, train_size, knobs, auto=3, parts=True)
