"""Index kinds: one registry, as timm's ``register_model`` is; each kind is one module of this package holding one
``SPEC = KindSpec(...)``.

``--kind``'s choices, ``auto``'s candidates, ``--parts`` and tuning all ask the registry, so adding a kind is one
module here plus its tests. The registry finds the modules itself (``pkgutil``), so there is no list to keep.

Example:
    >>> get_kind("ivf").choose(1_000_000, 512, 8 * 10**9, False).factory
    'IVF1024,Flat'
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from ...errors import UserError
from ...registry import Registry

# Kinds that hold no ids of their own (graphs, refine stages) are wrapped in an id map, so that the tuning queries can
# be held out of the index while it is tuned and added afterwards (recall measured on fresh queries).
IDS = "IDMap2,"
IDMAP_BYTES = 48  # per vector: the id and the reverse map (IDMap2 can return stored vectors by id)


@dataclass(frozen=True)
class Choice:
    """The index to build and why."""

    kind: str
    factory: str
    reason: str
    nlist: int = 0
    estimated_bytes: int = 0
    train_size: int = 0  # rows to sample for training (0: no training)


@dataclass(frozen=True)
class Knob:
    """A search parameter that trades speed for recall, with its candidate values (recall grows along them)."""

    name: str
    values: range


def no_training(n: int, nlist: int) -> int:
    return 0


def no_knobs(factory: str) -> tuple[Knob, ...]:
    return ()


@dataclass(frozen=True)
class KindSpec:
    """Everything the pipeline asks of one index kind.

    Attributes:
        name: the ``--kind`` value; the module is named after it.
        choose: ``(n, dim, budget_bytes, parts) -> Choice``: the factory string for ``n`` vectors of ``dim`` under
            the budget (``parts``: the index will be built in parts and merged), with why, nlist, size and train size.
        estimate: ``(n, dim, nlist, m) -> bytes``: the index's rough resident size (``m``: the kind's code bytes).
        train_size: ``(n, nlist) -> rows`` sampled to train it (0: it needs no training).
        knobs: ``factory -> (Knob, ...)``: the search parameters that trade speed for recall on an index built from
            one of this kind's factory strings, the main one first; tuning searches them, in this order.
        auto: where ``--kind auto`` measures this kind among its candidates (ascending), or None: not measured.
        parts: it can be built in parts and merged (inverted lists, FAISS's on-disk merge).
        exact: exact search: ``auto``'s choice for small sets, nothing to tune.
        fallback: it sizes itself to any budget: ``auto``'s choice when no measured kind fits.
    """

    name: str
    choose: Callable[[int, int, int, bool], Choice]
    estimate: Callable[[int, int, int, int], int]
    train_size: Callable[[int, int], int] = no_training
    knobs: Callable[[str], tuple[Knob, ...]] = no_knobs
    auto: int | None = None
    parts: bool = False
    exact: bool = False
    fallback: bool = False


KINDS: Registry[KindSpec] = Registry(__name__, "SPEC", "index kind")
kind_names = KINDS.names  # the kinds' names, sorted (none imported)


def specs() -> tuple[KindSpec, ...]:
    """Every registered kind, by name."""
    return tuple(KINDS.all())


def get_kind(name: str) -> KindSpec:
    """The kind called ``name``, or a UserError listing the kinds there are (and the other ways to choose)."""
    if name not in kind_names():
        raise UserError(f"unknown index kind {name!r}; use one of auto, {', '.join(kind_names())}, or give any FAISS "
                        "index_factory string with --factory")
    return KINDS.get(name)


def auto_kinds() -> tuple[KindSpec, ...]:
    """The kinds ``--kind auto`` measures, in the order it measures (and, unmeasured, prefers) them."""
    return tuple(sorted((s for s in specs() if s.auto is not None), key=lambda s: (s.auto, s.name)))


def nlist_for(n: int, per_sqrt: int = 1) -> int:
    """IVF list count: the power of two nearest ``per_sqrt``·√N, at least 16 and at most N/39."""
    target = max(16, 2 ** round(math.log2(max(per_sqrt * math.sqrt(max(n, 1)), 1))))
    while target > 16 and n / target < 39:  # FAISS wants >= 39 training points per centroid
        target //= 2
    return target


def nlist_of(factory: str) -> int:
    """The list count of an IVF factory string (0: no inverted lists)."""
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def nprobe(factory: str) -> Knob:
    """How many inverted lists a query scans: 1 up to all of them."""
    return Knob("nprobe", range(1, nlist_of(factory) + 1))


REFINE = Knob("k_factor_rf", range(1, 129))  # a refine stage re-ranks k_factor_rf·k shortlisted vectors
