"""The ``index.json`` record: what an index holds, from where, how it was built and tuned, and how well it does.

The one place that knows its field names. ``from_dict`` refuses unknown and missing fields and reads every
``index.json`` an older release wrote (``sources``, ``reason`` and the optional sections have defaults).
"""
from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from ..errors import UserError
from ..records import EmbeddingMeta, strict_fields
from ..version import __version__

FORMAT = "embedpipe-index/1"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardEntry:
    """One embedding file an index holds: its rows, the id of its first row, when it was added."""

    rows: int
    id_start: int
    added: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class IndexRecord:
    """``index.json``: built by ``build``/``run_merge``, extended by ``update``, read by search, serve and verify."""

    factory: str
    kind: str
    metric: str
    dim: int
    count: int
    embedding_dtype: str
    tuning: Mapping[str, Any]  # ``tune.Tuning.to_dict()``: params, recall@1/@10, target, latency, method...
    source: str  # the embedding folder of the build
    shards: Mapping[str, ShardEntry]
    embedding_meta: EmbeddingMeta | None  # the shards' metadata (None: they recorded none)
    config: Mapping[str, Any]  # the IndexConfig of the build
    memory_budget: int
    estimated_bytes: int
    next_id: int
    tuned_at_count: int
    created: str
    updated: str
    search_params: Mapping[str, int] = field(default_factory=dict)
    reason: str = ""
    on_disk: bool = False
    sources: tuple[str, ...] = ()  # every embedding folder it holds shards of (older releases: only ``source``)
    updates: tuple[Mapping[str, Any], ...] = ()  # one entry per ``--update`` that added shards
    auto: Mapping[str, Any] | None = None  # what ``--kind auto`` measured
    build_seconds: Mapping[str, float] | None = None
    merged_from_parts: int | None = None
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> {bytes, sha256} as written
    text_queries: Mapping[str, Any] | None = None  # an image-text model's: recall of text queries (text_recall.py)
    format: str = FORMAT
    version: str = __version__  # the embedpipe that built it

    @classmethod
    def new(cls, **fields: Any) -> "IndexRecord":
        """A fresh record: created/updated now, ``next_id`` and ``tuned_at_count`` at ``count``, its search
        parameters from the tuning, its one source."""
        stamp = now()
        return cls(**{"created": stamp, "updated": stamp, "next_id": fields["count"],
                      "tuned_at_count": fields["count"], "search_params": dict(fields["tuning"]["params"]),
                      "sources": (fields["source"],), **fields})

    @property
    def source_dirs(self) -> list[str]:
        """Every embedding folder the index holds shards of: the build's, then each ``--update``'s."""
        return list(self.sources or (self.source,))

    @property
    def model(self) -> str | None:
        return self.embedding_meta.model if self.embedding_meta else None

    @property
    def recall_at_1(self) -> float:
        return float(self.tuning.get("recall@1", 1.0))

    @property
    def recall_at_10(self) -> float:
        return float(self.tuning.get("recall@10", 1.0))

    @property
    def text_recall_at_10(self) -> float | None:
        """recall@10 of text queries (an image-text model's index), None where none were measured."""
        return float(self.text_queries["recall@10"]) if self.text_queries else None

    @property
    def target_recall(self) -> float | None:
        value = self.tuning.get("target_recall")
        return None if value is None else float(value)

    @property
    def latency_ms_p50(self) -> float:
        return float(self.tuning.get("latency_ms_p50", 0.0))

    def params_text(self) -> str:
        """``nprobe=12, k_factor_rf=4``, or an empty string for an index with no search parameters."""
        return ", ".join(f"{k}={v}" for k, v in self.search_params.items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``index.json`` holds (the same keys every release wrote; empty optional sections left out)."""
        d = _plain(self)
        d["sources"] = self.source_dirs
        d["updates"] = [dict(u) for u in self.updates]
        d["files"] = {name: dict(check) for name, check in self.files.items()}
        for optional in ("updates", "auto", "build_seconds", "merged_from_parts", "files", "text_queries"):
            if not d[optional]:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "index record") -> "IndexRecord":
        values = _typed(cls, d, where)
        _check_types(values, where)
        values["sources"] = tuple(values.get("sources") or ())
        values["updates"] = tuple(values.get("updates") or ())
        return cls(**values)


@dataclass(frozen=True)
class TrainRecord:
    """``<OUT>.parts/train.json``: the shared trained quantizer of a parted build and the shard -> id table, so
    parts need no coordination; the merge turns it into the :class:`IndexRecord`."""

    factory: str
    kind: str
    reason: str
    metric: str
    dim: int
    dtype: str
    count: int
    shards: Mapping[str, ShardEntry]
    embedding_meta: EmbeddingMeta | None
    memory_budget: int
    estimated_bytes: int
    train_seconds: float
    source: str
    trained_sha256: str
    config: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "train record") -> "TrainRecord":
        return cls(**_typed(cls, d, where))


def _plain(record: IndexRecord | TrainRecord) -> dict[str, Any]:
    """A record's fields as JSON values (its shard entries and embedding metadata as the files hold them)."""
    d = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    d["shards"] = {name: s.to_dict() for name, s in record.shards.items()}
    d["embedding_meta"] = record.embedding_meta.to_dict() if record.embedding_meta else {}
    return d


# The JSON type of each field a reader uses as a value (a service would load "dim": "abc" and fail on every search).
_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("factory", "kind", "metric", "embedding_dtype", "source", "created", "updated", "reason",
                     "format", "version"), (str,)),
    **dict.fromkeys(("dim", "count", "memory_budget", "estimated_bytes", "next_id", "tuned_at_count"), (int,)),
    **dict.fromkeys(("tuning", "config", "search_params"), (Mapping,)),
    "on_disk": (bool,), "merged_from_parts": (int, type(None)), "auto": (Mapping, type(None)),
    "build_seconds": (Mapping, type(None)), "sources": (list,), "updates": (list,),
}
_NAMES = {str: "a string", int: "an integer", bool: "true or false", Mapping: "an object", list: "a list"}


def _check_types(values: dict[str, Any], where: str) -> None:
    """Refuse a field of the wrong JSON type, a dim below 1 and search parameters that are not integers."""
    def bad(name: str, want: str, got: Any) -> UserError:
        return UserError(f"{where}: {name!r} must be {want}, found {reprlib.repr(got)}; the file is damaged or was edited: "
                         "rebuild the index with `embedpipe index ... --overwrite`")

    for name, types in _TYPES.items():
        value = values.get(name)
        if name in values and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise bad(name, " or ".join(_NAMES.get(t, "null") for t in types), value)
    if values["dim"] < 1:
        raise bad("dim", "a positive integer", values["dim"])
    for name, value in values["search_params"].items():
        if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"search_params.{name}", "an integer", value)


def _typed(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The strict reading of a record's fields, its shard entries and embedding metadata made typed."""
    values = strict_fields(cls, d, where)
    try:
        values["shards"] = {name: ShardEntry(**entry) for name, entry in values["shards"].items()}
    except (TypeError, AttributeError) as e:
        raise UserError(f"{where}: a 'shards' entry is not {{rows, id_start, added}} ({e}); the file is damaged: "
                        "rebuild the index with --overwrite") from None
    meta = values["embedding_meta"]
    values["embedding_meta"] = EmbeddingMeta.from_dict(meta, f"{where}: embedding_meta") if meta else None
    return values
