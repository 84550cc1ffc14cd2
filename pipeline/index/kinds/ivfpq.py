"""``ivfpq``: IVF-PQ, short PQ codes scanned per list, the shortlist re-ranked with finer codes when the budget allows.

Plain PQ rarely reaches recall@10 0.95 against exact search (its distances are too coarse to order close
neighbours), so the PQ shortlist is re-ranked with float16 codes (2 bytes/dim) or, when that does not fit, 8-bit
codes (1 byte/dim). Parts (on-disk merge) hold inverted lists only, so they get plain PQ. When no re-ranking fits,
the PQ code is sized to the budget and recall is capped by it (reported in index.json): this is the kind that fits
any budget that can hold a byte per vector, ``auto``'s choice when nothing else fits.
"""
from __future__ import annotations

import math

from ...errors import UserError
from . import IDMAP_BYTES, IDS, REFINE, Choice, KindSpec, Knob, nlist_for, nprobe
from . import ivf


def estimate(n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """``m``: bytes per vector (PQ code, plus refine codes and id map when re-ranked)."""
    return n * (m + 8) + nlist * dim * 4 + 256 * dim * 4


def train_size(n: int, nlist: int) -> int:
    # the coarse quantizer's share (as IVF's), and at least 40 points for each of a sub-quantizer's 256 centroids
    return max(ivf.train_size(n, nlist), min(n, 256 * 40))


def pq_m_for(n: int, dim: int, budget: int, nlist: int) -> int | None:
    """Largest PQ sub-quantizer count (bytes/vector) dividing ``dim``, at most dim/2, that fits ``budget``."""
    fixed = nlist * dim * 4 + 2**20
    for m in sorted((m for m in range(1, dim // 2 + 1) if dim % m == 0), reverse=True):
        if n * (m + 8) * 1.1 + fixed <= budget:
            return m
    return None


def choose(n: int, dim: int, budget: int, parts: bool) -> Choice:
    nlist = nlist_for(n)
    train = train_size(n, nlist)
    gb = budget / 1e9
    flat = ivf.estimate(n, dim, nlist)
    m = next((m for m in (dim // 8, dim // 16, dim // 4, 8, 4) if m >= 1 and dim % m == 0), 1)
    # 256 centroids per sub-quantizer want ~10k training points; tiny sets get fewer bits
    bits = "" if n >= 10_000 else f"x{max(2, min(8, int(math.log2(max(n // 39, 4)))))}"
    for codes, bpd in (("SQfp16", 2), ("SQ8", 1)):
        est = estimate(n, dim, nlist, m + bpd * dim + IDMAP_BYTES)
        if not parts and est <= budget:
            return Choice("ivfpq", f"{IDS}IVF{nlist},PQ{m}{bits},Refine({codes})",
                          f"{n} vectors: IVF-PQ{m} re-ranked with {codes} ({est / 1e9:.2f} GB; float32 IVF would "
                          f"need {flat / 1e9:.2f} GB, budget {gb:.2f} GB)", nlist, est, train)
    m = pq_m_for(n, dim, budget, nlist)
    if m is None:
        need = estimate(n, dim, nlist, 1)
        raise UserError(f"{n} vectors of dim {dim} do not fit --memory {gb:.2f} GB even as IVF-PQ with 1 byte per "
                        f"vector (needs ~{need / 1e9:.2f} GB); raise --memory or index a subset")
    est = estimate(n, dim, nlist, m)
    return Choice("ivfpq", f"IVF{nlist},PQ{m}{bits}", f"{n} vectors: IVF-PQ, {m} bytes/vector ({est / 1e9:.2f} GB; "
                  f"float32 IVF would need {flat / 1e9:.2f} GB, budget {gb:.2f} GB); recall is capped by the code size",
                  nlist, est, train)


def knobs(factory: str) -> tuple[Knob, ...]:
    return (nprobe(factory), REFINE) if "Refine(" in factory else (nprobe(factory),)


SPEC = KindSpec("ivfpq", choose, estimate, train_size, knobs, parts=True, fallback=True)
