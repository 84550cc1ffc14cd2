"""Which FAISS index to build for a set of vectors: kinds, metrics, memory budgets and the choice itself."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw", "fastscan")
METRICS = ("ip", "l2")
FLAT_MAX = 50_000  # auto: exact search below this many vectors (a query scans N*D floats: ~25 MFLOP at D=512)
HNSW_M = 32
# Kinds that hold no ids of their own (graphs, refine stages) are wrapped in an id map, so that the tuning queries can
# be held out of the index while it is tuned and added afterwards (recall measured on fresh queries).
IDS = "IDMap2,"
IDMAP_BYTES = 48  # per vector: the id and the reverse map (IDMap2 can return stored vectors by id)
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


def nlist_for(n: int, per_sqrt: int = 1) -> int:
    """IVF list count: the power of two nearest ``per_sqrt``·√N, at least 16 and at most N/39."""
    target = max(16, 2 ** round(math.log2(max(per_sqrt * math.sqrt(max(n, 1)), 1))))
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
        return n * (dim * 4 + 8 * HNSW_M + 16 + IDMAP_BYTES)
    if kind == "fastscan":  # m: bytes per vector of the refine codes; 4-bit PQ codes of dim/2 sub-vectors
        return n * (dim // 4 + 8 + m + IDMAP_BYTES) + nlist * dim * 4
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

    ``auto`` is exact (Flat) for small sets; above that, ``build`` measures every kind of :func:`candidates` on a
    sample (``auto.pick``) and this returns the first, the usual winner, only where nothing is measured. ``parts``
    forces IVF (only inverted lists can be built in parts and merged): IVF-Flat when it fits, else IVF-PQ.
    """
    if factory:
        return Choice("factory", factory, "--factory given", nlist_of(factory), estimate_bytes("?", n, dim),
                      _train_size_for(factory, n))
    nlist = nlist_for(n)
    if kind == "auto":
        if parts:
            kind = "ivf" if estimate_bytes("ivf", n, dim, nlist) <= budget else "ivfpq"
        elif n <= FLAT_MAX and estimate_bytes("flat", n, dim) <= budget:
            return Choice("flat", "Flat", f"{n} vectors <= {FLAT_MAX}: exact search is fast enough",
                          estimated_bytes=estimate_bytes("flat", n, dim))
        else:
            return candidates(n, dim, budget)[0]
    if parts and kind not in ("ivf", "ivfpq"):
        raise UserError(f"--parts needs an IVF index (--kind ivf or ivfpq, or auto), not --kind {kind}")
    if kind == "flat":
        est = estimate_bytes("flat", n, dim)
        return Choice("flat", "Flat", "--kind flat: exact search", estimated_bytes=est)
    if kind == "hnsw":
        est = estimate_bytes("hnsw", n, dim)
        return Choice("hnsw", f"{IDS}HNSW{HNSW_M},Flat", f"{n} vectors: HNSW graph, {est / 1e9:.2f} GB",
                      estimated_bytes=est)
    if kind == "fastscan":
        return _fastscan(n, dim, budget)
    train = min(n, max(64 * nlist, 20_000))
    if kind == "ivf":
        est = estimate_bytes("ivf", n, dim, nlist)
        return Choice("ivf", f"IVF{nlist},Flat", f"{n} vectors: IVF with {nlist} ≈ √N lists, "
                      f"{est / 1e9:.2f} GB", nlist, est, train)
    if kind == "ivfpq":
        return _ivfpq(n, dim, budget, nlist, max(train, min(n, 256 * 40)), refine=not parts)
    raise UserError(f"unknown --kind {kind!r}; use one of {', '.join(KINDS)}")


def candidates(n: int, dim: int, budget: int) -> list[Choice]:
    """The kinds ``auto`` measures for ``n`` vectors, those that fit ``budget`` (at least one: IVF-PQ sized to it).

    Fast-scan IVF-PQ with a re-ranking stage, an HNSW graph and IVF-Flat each win somewhere (by size, dimension,
    data and machine), so ``auto.pick`` builds each on a sample and keeps the fastest at the target recall.
    """
    out = []
    for kind in ("fastscan", "hnsw", "ivf"):
        c = choose(kind, n, dim, budget)
        if c.estimated_bytes <= budget:
            out.append(c)
    return out or [choose("ivfpq", n, dim, budget)]


def _fastscan(n: int, dim: int, budget: int) -> Choice:
    """IVF with 4·√N lists, 4-bit PQ codes of residuals scanned with SIMD (fast-scan), the shortlist re-ranked.

    4-bit codes of dim/2 sub-vectors are too coarse to order close neighbours but quick to scan: the best
    ``k_factor_rf``·k of them are re-ranked with float16 codes (exact for float16 embeddings), or 8-bit codes when
    float16 ones do not fit the budget.
    """
    nlist = nlist_for(n, per_sqrt=4)
    m = max((m for m in range(1, dim // 2 + 1) if dim % m == 0 and (m % 2 == 0 or m == 1)), default=1)
    train = min(n, max(40 * nlist, 10_000))
    est = 0
    for codes, bpd in (("SQfp16", 2), ("SQ8", 1)):
        est = estimate_bytes("fastscan", n, dim, nlist, bpd * dim)
        if est <= budget:
            break
    return Choice("fastscan", f"{IDS}IVF{nlist},PQ{m}x4fsr,Refine({codes})",
                  f"{n} vectors: IVF with {nlist} ≈ 4√N lists, fast-scan PQ{m} re-ranked with {codes}, "
                  f"{est / 1e9:.2f} GB", nlist, est, train)


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
        est = estimate_bytes("ivfpq", n, dim, nlist, m + bpd * dim + IDMAP_BYTES)
        if refine and est <= budget:
            return Choice("ivfpq", f"{IDS}IVF{nlist},PQ{m}{bits},Refine({codes})",
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
