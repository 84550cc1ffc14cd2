"""``flat``: exact search, every query compared with every vector; ``auto``'s choice for small sets."""
from __future__ import annotations

from . import Choice, KindSpec


def estimate(n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    return n * dim * 4


def choose(n: int, dim: int, budget: int, parts: bool) -> Choice:
    return Choice("flat", "Flat", "--kind flat: exact search", estimated_bytes=estimate(n, dim))


SPEC = KindSpec("flat", choose, estimate, exact=True)
