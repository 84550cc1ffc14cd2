"""Stored columns read fast: an id table's strings by offsets, repeated values as codes, and a byte-bounded
cache of embedding files' columns (what a search takes per hit costs microseconds, not an Arrow call)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import store


class Strings:
    """A string column as one bytes object and each row's (start, end) in it: ``take`` of a search's few rows is a
    slice and a decode each, with no Python object held per row and no Arrow call (whose overhead dominated)."""

    def __init__(self, column: pa.Array):
        arr = column.cast(pa.large_string())
        _, offsets, data = arr.buffers()
        o = np.frombuffer(offsets, np.int64, len(arr) + 1, arr.offset * 8)
        self.spans = np.stack([o[:-1], o[1:]], axis=1)
        self.data = data.to_pybytes() if data is not None else b""

    def take(self, rows: np.ndarray) -> list[str]:
        d = self.data
        return [d[a:b].decode() for a, b in self.spans[rows].tolist()]


def codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A string column as (int32 codes per row, numpy object array of the distinct values)."""
    enc = pc.dictionary_encode(column.combine_chunks())
    return enc.indices.to_numpy(zero_copy_only=False), np.array(enc.dictionary.to_pylist(), dtype=object)


def read_vectors(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """The stored embeddings of one embedding file (only ``rows`` when given), as float32."""
    col = pq.read_table(path, columns=["embedding"]).column("embedding")
    return store.embedding_matrix(col if rows is None else col.take(pa.array(rows)))


def read_column(path: Path, column: str) -> pa.Array | None:
    """One stored column of an embedding file; None when the file lacks it or is gone."""
    try:
        if column not in pq.read_schema(path).names:
            return None
        return pq.read_table(path, columns=[column]).column(column).combine_chunks()
    except (OSError, pa.ArrowInvalid):
        return None


class FileCache:
    """Columns of embedding files by (file, column), least recently used dropped first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()

    def __contains__(self, name: tuple[str, str]) -> bool:
        return name in self.items

    def get(self, name: tuple[str, str], load: Callable[[], Any]) -> Any:
        with self.lock:
            if name in self.items:
                self.items.move_to_end(name)
                return self.items[name]
        value = load()  # outside the lock: two threads may read the same file once each, none waits on another
        with self.lock:
            if name not in self.items:
                self.items[name] = value
                self.bytes += getattr(value, "nbytes", 0)
            while len(self.items) > 1 and self.bytes > self.max_bytes:
                self.bytes -= getattr(self.items.popitem(last=False)[1], "nbytes", 0)
        return value
