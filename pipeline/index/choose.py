"""Which FAISS index to build for a set of vectors: kinds, metrics, memory budgets and the choice itself."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
METRICS = ("ip", "l2")
FLAT_MAX = 50_000  # auto: exact search below this many vectors (a query scans N*D floats: ~25 MFLOP at D=512)
HNSW_MAX = 200_000  # auto: HNSW up to here (best latency at high recall, but slow to build and no --parts)
HNSW_M = 32
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


def nlist_for(n: int) -> int:
    """IVF list count on the √N scale: the power of two nearest √N, at least 16 and at most N/39."""
    target = max(16, 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1))))
    while target > 16 and n / target < 39:  # FAISS wants >= 39 training points per centroid
        target //= 2
    return target


def pq_m_for(n: int, dim: int, budget: int, nlist: int) -> int | None:
    """Largest PQ sub-quantizer count (bytes/vector) dividing ``dim``, at most dim/2, that fits ``budget``."""
    fixed = nlist * dim * 4 + 2**20
    for m in sorted((m for m in range(1, dim // 2 + 1) if dim % m == 0), reverse=True):
        if n * (m + 8) * 1.1 + fixed <= budget:
            return m
    return None


def estimate_bytes(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """Rough resident size of an index of ``n`` vectors (codes, ids, graph links, centroids)."""
    if kind == "flat":
        return n * dim * 4
    if kind == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + 8 * HNSW_M + 16)
    if kind == "ivfpq":
        return n * (m + 8) + nlist * dim * 4 + 256 * dim * 4
    return n * dim * 4  # unknown factory: assume flat-sized


@dataclass(frozen=True)
class Choice:
    """The index to build and why."""

    kind: str
    factory: str
    reason: str
    nlist: int = 0
    estimated_bytes: int = 0
    train_size: int = 0  # rows to sample for training (0: no training)


def choose(kind: str, n: int, dim: int, budget: int, factory: str | None = None, parts: bool = False) -> Choice:
    """Pick a FAISS factory string for ``n`` vectors of ``dim`` under a ``budget`` in bytes.

    ``auto`` is exact (Flat) for small sets, HNSW or IVF (√N lists) for medium ones, and IVF-PQ with as
    many bytes per vector as the budget allows when flat storage would not fit. ``parts`` forces IVF
    (only inverted lists can be built in parts and merged).
    """
    gb = budget / 1e9
    if factory:
        return Choice("factory", factory, "--factory given", nlist_of(factory), estimate_bytes("?", n, dim),
                      _train_size_for(factory, n))
    nlist = nlist_for(n)
    if kind == "auto":
        flat_fits = estimate_bytes("ivf", n, dim, nlist) <= budget
        if parts:
            kind = "ivf" if flat_fits else "ivfpq"
        elif n <= FLAT_MAX and estimate_bytes("flat", n, dim) <= budget:
            return Choice("flat", "Flat", f"{n} vectors <= {FLAT_MAX}: exact search is fast enough",
                          estimated_bytes=estimate_bytes("flat", n, dim))
        elif n <= HNSW_MAX and estimate_bytes("hnsw", n, dim) <= budget:
            kind = "hnsw"
        elif flat_fits:
            kind = "ivf"
        else:
            kind = "ivfpq"
    if parts and kind not in ("ivf", "ivfpq"):
        raise UserError(f"--parts needs an IVF index (--kind ivf or ivfpq, or auto), not --kind {kind}")
    if kind == "flat":
        est = estimate_bytes("flat", n, dim)
        return Choice("flat", "Flat", "--kind flat: exact search", estimated_bytes=est)
    if kind == "hnsw":
        est = estimate_bytes("hnsw", n, dim)
        return Choice("hnsw", f"HNSW{HNSW_M},Flat", f"{n} vectors: HNSW graph ({est / 1e9:.2f} GB <= {gb:.2f} GB)",
                      estimated_bytes=est)
    train = min(n, max(64 * nlist, 20_000))
    if kind == "ivf":
        est = estimate_bytes("ivf", n, dim, nlist)
        return Choice("ivf", f"IVF{nlist},Flat", f"{n} vectors: IVF with {nlist} ≈ √N lists, "
                      f"{est / 1e9:.2f} GB", nlist, est, train)
    if kind == "ivfpq":
        return _ivfpq(n, dim, budget, nlist, max(train, min(n, 256 * 40)), refine=not parts)
    raise UserError(f"unknown --kind {kind!r}; use one of {', '.join(KINDS)}")


def _ivfpq(n: int, dim: int, budget: int, nlist: int, train: int, refine: bool = True) -> Choice:
    """IVF-PQ: short PQ codes scanned per list, the shortlist re-ranked with finer codes when the budget allows.

    Plain PQ rarely reaches recall@10 0.95 against exact search (its distances are too coarse to order close
    neighbours), so the PQ shortlist is re-ranked with float16 codes (2 bytes/dim, ~1.9x less than float32) or,
    when that does not fit, 8-bit codes (1 byte/dim, ~3.5x less). Parts (on-disk merge) hold inverted lists
    only, so they get plain PQ. When no re-ranking fits, the PQ code is sized to the budget and recall is
    capped by it (reported in index.json).
    """
    gb = budget / 1e9
    flat = estimate_bytes("ivf", n, dim, nlist)
    m = next((m for m in (dim // 8, dim // 16, dim // 4, 8, 4) if m >= 1 and dim % m == 0), 1)
    # 256 centroids per sub-quantizer want ~10k training points; tiny sets get fewer bits
    bits = "" if n >= 10_000 else f"x{max(2, min(8, int(math.log2(max(n // 39, 4)))))}"
    for codes, bpd in (("SQfp16", 2), ("SQ8", 1)):
        est = estimate_bytes("ivfpq", n, dim, nlist, m + bpd * dim)
        if refine and est <= budget:
            return Choice("ivfpq", f"IVF{nlist},PQ{m}{bits},Refine({codes})",
                          f"{n} vectors: IVF-PQ{m} re-ranked with {codes} ({est / 1e9:.2f} GB; float32 IVF would "
                          f"need {flat / 1e9:.2f} GB, budget {gb:.2f} GB)", nlist, est, train)
    m = pq_m_for(n, dim, budget, nlist)
    if m is None:
        need = estimate_bytes("ivfpq", n, dim, nlist, 1)
        raise UserError(f"{n} vectors of dim {dim} do not fit --memory {gb:.2f} GB even as IVF-PQ with 1 byte per "
                        f"vector (needs ~{need / 1e9:.2f} GB); raise --memory or index a subset")
    est = estimate_bytes("ivfpq", n, dim, nlist, m)
    return Choice("ivfpq", f"IVF{nlist},PQ{m}{bits}", f"{n} vectors: IVF-PQ, {m} bytes/vector ({est / 1e9:.2f} GB; "
                  f"float32 IVF would need {flat / 1e9:.2f} GB, budget {gb:.2f} GB); recall is capped by the code size",
                  nlist, est, train)


def nlist_of(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def _train_size_for(factory: str, n: int) -> int:
    nlist = nlist_of(factory)
    needs = nlist or ("PQ" in factory or "SQ" in factory or "OPQ" in factory or "PCA" in factory)
    return min(n, max(64 * nlist, 20_000)) if needs else 0
