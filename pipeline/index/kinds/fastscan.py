"""``fastscan``: IVF with 4·√N lists, 4-bit PQ codes of residuals scanned with SIMD (fast-scan), the shortlist
re-ranked with finer codes.

4-bit codes of dim/2 sub-vectors are too coarse to order close neighbours but quick to scan: the best
``k_factor_rf``·k of them are re-ranked with float16 codes (exact for float16 embeddings), or 8-bit codes when
float16 ones do not fit the budget.
"""
from __future__ import annotations

from . import IDMAP_BYTES, IDS, REFINE, Choice, KindSpec, Knob, nlist_for, nprobe


def estimate(n: int, dim: int, nlist: int = 0, m: int = 0) -> int:
    """``m``: bytes per vector of the refine codes; the 4-bit PQ codes of dim/2 sub-vectors take dim/4."""
    return n * (dim // 4 + 8 + m + IDMAP_BYTES) + nlist * dim * 4


def train_size(n: int, nlist: int) -> int:
    return min(n, max(40 * nlist, 10_000))


def choose(n: int, dim: int, budget: int, parts: bool) -> Choice:
    nlist = nlist_for(n, per_sqrt=4)
    m = max((m for m in range(1, dim // 2 + 1) if dim % m == 0 and (m % 2 == 0 or m == 1)), default=1)
    est = 0
    for codes, bpd in (("SQfp16", 2), ("SQ8", 1)):
        est = estimate(n, dim, nlist, bpd * dim)
        if est <= budget:
            break
    return Choice("fastscan", f"{IDS}IVF{nlist},PQ{m}x4fsr,Refine({codes})",
                  f"{n} vectors: IVF with {nlist} ≈ 4√N lists, fast-scan PQ{m} re-ranked with {codes}, "
                  f"{est / 1e9:.2f} GB", nlist, est, train_size(n, nlist))


def knobs(factory: str) -> tuple[Knob, ...]:
    return (nprobe(factory), REFINE)


SPEC = KindSpec("fastscan", choose, estimate, train_size, knobs, auto=1)
