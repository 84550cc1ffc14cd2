"""Which indexed rows a key names: a row is identified by its (source shard, key), never by its key alone.

img2dataset numbers keys from ``000000000`` in every run, so two of its output folders embedded into one share
keys. Such rows are different items: a search by a key that several shards hold answers for each of them,
labelled by shard, and a shard selector (its url, a trailing part of its path, or its file name) picks one.
The same (shard, key) indexed twice is a re-embedded copy, which ``index --update`` refuses and ``verify`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EXAMPLES = 3  # how many examples a finding names


def shard_matches(url: str, selector: str) -> bool:
    """``selector`` names the shard ``url``: equal, or a trailing part of its path (``run2/00000.tar``,
    ``00000.tar``), cut at a ``/``."""
    sel = selector.strip()
    return bool(sel) and (url == sel or url.endswith("/" + sel.lstrip("/")))


def short_shard(url: str) -> str:
    """A shard url as a table shows it: its folder and file name (``run2/00000.tar``)."""
    parts = url.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else url


@dataclass(frozen=True)
class KeyRows:
    """The rows one queried key names: ``ids`` (FAISS ids, one per shard holding it) and their shard urls."""

    key: str
    selector: str | None
    ids: np.ndarray
    shards: list[str]


class KeyTable:
    """Key → rows of an id table (``key`` and ``shard`` per row; row i is id i). Built lazily per lookup, or
    ``cached`` as a dict for a service's many lookups (one entry per key, a list only for shared keys)."""

    def __init__(self, keys: pa.Array, shard_codes: np.ndarray, shard_names: np.ndarray, cached: bool = False):
        self.keys, self.shard_codes, self.shard_names = keys, shard_codes, shard_names
        self.one: dict[str, int] | None = None
        self.many: dict[str, list[int]] = {}
        self._shared: set[str] | None = None
        if cached:
            self.one = {k: i for i, k in enumerate(keys.to_pylist())}  # a shared key ends on its last row: fixed below
            for key, ids in self._positions(shared_keys(keys)).items():
                self.many[key] = ids
                del self.one[key]

    def shard_of(self, i: int) -> str:
        return str(self.shard_names[self.shard_codes[i]])

    def _positions(self, wanted: Iterable[str]) -> dict[str, list[int]]:
        wanted = list(dict.fromkeys(wanted))
        if not wanted:
            return {}
        pos = np.flatnonzero(pc.is_in(self.keys, value_set=pa.array(wanted, pa.string())).to_numpy(zero_copy_only=False))
        found: dict[str, list[int]] = {}
        for i, k in zip(pos.tolist(), self.keys.take(pa.array(pos)).to_pylist()):
            found.setdefault(k, []).append(i)
        return found

    def rows_of(self, keys: Sequence[str]) -> dict[str, list[int]]:
        """Every row of each key (absent keys absent)."""
        if self.one is None:
            return self._positions(keys)
        out = {}
        for k in keys:
            if k in self.one:
                out[k] = [self.one[k]]
            elif k in self.many:
                out[k] = self.many[k]
        return out

    def is_shared(self, key: str) -> bool:
        """Several rows hold ``key`` (an uncached table counts every key once, on the first call)."""
        if self.one is not None:
            return key in self.many
        if self._shared is None:
            self._shared = set(shared_keys(self.keys))
        return key in self._shared

    def find(self, keys: Sequence[str], selectors: Sequence[str | None] | None = None) -> list[KeyRows]:
        """The rows each key names, restricted to the shards its selector names (when given)."""
        selectors = list(selectors) if selectors is not None else [None] * len(keys)
        rows = self.rows_of(keys)
        out = []
        for key, sel in zip(keys, selectors):
            ids = [i for i in rows.get(key, []) if sel is None or shard_matches(self.shard_of(i), sel)]
            out.append(KeyRows(key, sel, np.array(ids, np.int64), [self.shard_of(i) for i in ids]))
        return out

    def ids_of_pairs(self, keys: Sequence[str], shards: Sequence[str]) -> np.ndarray:
        """The id of each (key, exact shard url), -1 where not indexed."""
        rows = self.rows_of(keys)
        return np.array([next((i for i in rows.get(k, []) if self.shard_of(i) == s), -1)
                         for k, s in zip(keys, shards)], np.int64)

    def unique_ids(self, keys: Sequence[str]) -> np.ndarray:
        """The id of each key that exactly one row holds, -1 elsewhere (absent or shared)."""
        rows = self.rows_of(keys)
        return np.array([rows[k][0] if len(rows.get(k, ())) == 1 else -1 for k in keys], np.int64)


def shared_keys(keys: pa.Array | pa.ChunkedArray) -> list[str]:
    """Keys that occur on more than one row."""
    counts = pc.value_counts(keys)
    return counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()


@dataclass(frozen=True)
class Duplicates:
    """What a set of rows holds twice: the same (shard, key) on several rows (a re-embedded copy: a problem),
    and keys that several shards hold (different items: a finding, answered per shard)."""

    repeated_rows: int = 0
    repeated_examples: tuple[tuple[str, str], ...] = ()
    shared_keys: int = 0
    shared_examples: tuple[str, ...] = ()
    shards_per_key: int = 0

    def repeated_text(self) -> str:
        eg = ", ".join(f"{k!r} of {s}" for s, k in self.repeated_examples)
        return (f"{self.repeated_rows} row(s) repeat a (shard, key) that another row holds (e.g. {eg}): the same "
                "sample embedded twice, so searches return it twice")

    def shared_text(self) -> str:
        return (f"{self.shared_keys} key(s) occur in more than one shard (up to {self.shards_per_key} shards, e.g. "
                f"{list(self.shared_examples)}): these are different items that reuse keys (e.g. two img2dataset "
                "runs); a search by such a key answers for each shard, --key-shard picks one")


def duplicates(table: pa.Table) -> Duplicates:
    """The duplicates among rows with ``key`` and ``shard`` columns."""
    pairs = table.select(["shard", "key"]).group_by(["shard", "key"]).aggregate([([], "count_all")])
    rep = pairs.filter(pc.greater(pairs.column("count_all"), 1))
    per_key = pairs.group_by("key").aggregate([([], "count_all")])
    shared = per_key.filter(pc.greater(per_key.column("count_all"), 1))
    return Duplicates(
        repeated_rows=int(pc.sum(pc.subtract(rep.column("count_all"), 1)).as_py() or 0),
        repeated_examples=tuple(zip(rep.column("shard").to_pylist()[:EXAMPLES], rep.column("key").to_pylist()[:EXAMPLES])),
        shared_keys=shared.num_rows, shared_examples=tuple(shared.column("key").to_pylist()[:EXAMPLES]),
        shards_per_key=int(pc.max(shared.column("count_all")).as_py() or 0) if shared.num_rows else 0)


def file_rows(files: Sequence[Path]) -> pa.Table:
    """The (shard, key) of every row of embedding files."""
    if not files:
        return pa.table({"shard": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    return pa.concat_tables([pq.read_table(f, columns=["shard", "key"]) for f in files])
