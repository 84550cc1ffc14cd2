"""Which FAISS index to build for a set of vectors: metrics, memory budgets and the choice itself (``--kind auto``,
a kind of the registry in ``kinds/``, or a ``--factory`` string)."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from ..errors import UserError
from .kinds import Choice, KindSpec, auto_kinds, get_kind, kind_names, nlist_for, nlist_of, specs

__all__ = ["KINDS", "METRICS", "FLAT_MAX", "Choice", "nlist_for", "nlist_of", "parse_memory", "faiss_metric",
           "estimate_bytes", "choose", "candidates"]

KINDS = ("auto", *kind_names())
METRICS = ("ip", "l2")
FLAT_MAX = 50_000  # auto: exact search below this many vectors (a query scans N*D floats: ~25 MFLOP at D=512)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Parse a memory budget such as ``8GB``, ``512MiB`` or ``1.5g`` into bytes.

    Example:
        >>> parse_memory("8GB")
        8000000000
    """
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--memory {text!r} is not a size; write it like 8GB, 512MB or 16GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UserError(f"--memory {text!r} must be positive")
    return value


def faiss_metric(metric: str) -> Any:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """Rough resident size of an index of ``n`` vectors (codes, ids, graph links, centroids), as its kind estimates
    it; a ``--factory`` index (any other ``kind``) is assumed flat-sized."""
    if kind in kind_names():
        return get_kind(kind).estimate(n, dim, nlist, m)
    return n * dim * 4


def choose(kind: str, n: int, dim: int, budget: int, factory: str | None = None, parts: bool = False) -> Choice:
    """Pick a FAISS factory string for ``n`` vectors of ``dim`` under a ``budget`` in bytes.

    ``auto`` is exact for small sets; above that, ``build`` measures every kind of :func:`candidates` on a sample
    (``auto.pick``) and this returns the first, the usual winner, only where nothing is measured. ``parts`` needs a
    kind that can be built in parts: ``auto`` takes the first that fits the budget, in ``auto``'s order, else the
    one that sizes itself to any budget (IVF-Flat when it fits, else IVF-PQ).
    """
    if factory:
        return Choice("factory", factory, "--factory given", nlist_of(factory), estimate_bytes("?", n, dim),
                      _train_size_for(factory, n))
    if kind == "auto":
        return _auto(n, dim, budget, parts)
    spec = get_kind(kind)
    if parts and not spec.parts:
        able = " or ".join(s.name for s in specs() if s.parts)
        raise UserError(f"--parts needs an IVF index (--kind {able}, or auto), not --kind {kind}")
    return spec.choose(n, dim, budget, parts)


def _auto(n: int, dim: int, budget: int, parts: bool) -> Choice:
    if parts:
        c = None
        for spec in sorted((s for s in specs() if s.parts), key=_preference):
            c = spec.choose(n, dim, budget, True)
            if c.estimated_bytes <= budget:
                return c
        assert c is not None, "no index kind can be built in parts: one in pipeline/index/kinds/ needs parts=True"
        return c
    exact = next(s for s in specs() if s.exact)
    c = exact.choose(n, dim, budget, False)
    if n <= FLAT_MAX and c.estimated_bytes <= budget:
        return replace(c, reason=f"{n} vectors <= {FLAT_MAX}: exact search is fast enough")
    return candidates(n, dim, budget)[0]


def _preference(spec: KindSpec) -> tuple[Any, ...]:
    """Measured kinds in ``auto``'s order, then the others by name, the one sized to any budget last."""
    return spec.fallback, spec.auto is None, spec.auto or 0, spec.name


def candidates(n: int, dim: int, budget: int) -> list[Choice]:
    """The kinds ``auto`` measures for ``n`` vectors, those that fit ``budget`` (at least one: the fallback kind,
    IVF-PQ, sized to it).

    Fast-scan IVF-PQ with a re-ranking stage, an HNSW graph and IVF-Flat each win somewhere (by size, dimension,
    data and machine), so ``auto.pick`` builds each on a sample and keeps the fastest at the target recall.
    """
    out = []
    for spec in auto_kinds():
        c = spec.choose(n, dim, budget, False)
        if c.estimated_bytes <= budget:
            out.append(c)
    return out or [next(s for s in specs() if s.fallback).choose(n, dim, budget, False)]


def _train_size_for(factory: str, n: int) -> int:
    nlist = nlist_of(factory)
    needs = nlist or ("PQ" in factory or "SQ" in factory or "OPQ" in factory or "PCA" in factory)
    return min(n, max(64 * nlist, 20_000)) if needs else 0
