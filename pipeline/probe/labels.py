"""Labelled features for probes: where labels and split groups come from, and the one train/validation split
policy (class maps and their names: ``classes.py``)."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from .. import store
from ..captions import parse_json
from ..errors import UserError
from .classes import NAME_COLUMNS, ClassMap, NameScan
from .options import VAL_FRACTION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSource:
    """Where a row's label lives: a column (``label`` by default), or a field inside a JSON column.

    Example:
        >>> LabelSource(column="json", field="meta.species").value({"json": '{"meta": {"species": "cat"}}'}, 0)
        'cat'
    """

    column: str = "label"
    field: str | None = None

    @classmethod
    def make(cls, column: str | None = None, field: str | None = None) -> "LabelSource":
        """``--label-field`` alone reads from the ``json`` column."""
        return cls(column=column or ("json" if field else "label"), field=field or None)

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "field": self.field}

    def describe(self) -> str:
        return f"{self.column}.{self.field}" if self.field else self.column

    def value(self, columns: dict[str, list[Any]], i: int) -> Any:
        """The label of row ``i`` (None when missing); ``columns`` maps column name -> values."""
        v = columns[self.column][i]
        if self.field is None or v is None:
            return v
        obj = parse_json(v) if isinstance(v, (str, bytes)) else v  # None for bad or hostile json
        for part in self.field.split("."):
            if not isinstance(obj, dict) or part not in obj:
                return None
            obj = obj[part]
        return obj if isinstance(obj, (str, int)) and not isinstance(obj, bool) else None

    def values(self, columns: dict[str, list[Any]], n: int) -> list[Any]:
        return [self.value(columns, i) for i in range(n)]


def feed_names(scan: NameScan | None, labels: Sequence[Any], columns: dict[str, list[Any]]) -> None:
    """Give ``scan`` the names that the name columns among ``columns`` give these rows (``class_names.py``)."""
    if scan is not None:
        scan.add(labels, {(c, f): LabelSource(c, f).values(columns, len(labels)) for c, f in NAME_COLUMNS
                          if c in columns})


def batch_columns(batch: store.Batch, source: LabelSource) -> dict[str, list[Any]]:
    """The columns ``source`` needs, from a store.Batch (base ``label`` or a requested extra column)."""
    if source.column == "label":
        return {"label": batch.labels}
    return {source.column: batch.extra[source.column]}


def check_label_column(files: Sequence[Path], source: LabelSource) -> None:
    """Fail early, naming the columns that exist, when the label column is absent."""
    for f in files:
        names = pq.read_schema(f).names
        if source.column not in names:
            raise UserError(
                f"{f}: no label column {source.column!r} (columns: {', '.join(names)}); "
                "use --label-column NAME, or --label-field FIELD for a field of the json column"
            )


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def key_hashes(keys: Sequence[str], shards: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """blake2b-64 of each key, and of (shard, key) as a tie-break for keys repeated across shards."""
    shards = shards if shards is not None else [""] * len(keys)
    h1 = np.fromiter((_h64(k) for k in keys), dtype=np.uint64, count=len(keys))
    h2 = np.fromiter((_h64(f"{s}\0{k}") for s, k in zip(shards, keys)), dtype=np.uint64, count=len(keys))
    return h1, h2


def stable_split(
    keys: Sequence[str], class_ids: np.ndarray, fraction: float, shards: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
) -> np.ndarray:
    """Stratified validation mask chosen by key hash: the same keys land in validation on every run and
    whatever the order of rows or shards. Within each class the ``round(fraction * n)`` rows with the
    smallest hash are validation (at least one, and at least one left for training, when the class has
    two or more rows). Rows with class id -1 are in neither set (mask False).

    With ``groups`` (one value per row: the photo, video or product a row was cut from), rows of one group
    stay on one side: within each class whole groups go to validation, smallest group hash first, until they
    hold ``round(fraction * n)`` rows (at least one group, and at least one left for training, when the class has
    two or more groups). A row without a group value is a group of its own.

    Example:
        >>> stable_split(["a", "b", "c", "d"], np.array([0, 0, 1, 1]), 0.5).sum()
        2
        >>> stable_split(["a", "b", "c", "d"], np.array([0, 0, 0, 0]), 0.5, groups=["x", "x", "y", "y"]).sum()
        2
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    class_ids = np.asarray(class_ids)
    h1, h2 = key_hashes(keys, shards)
    if groups is not None:  # every row of a group gets the group's hash, whatever its key and shard: they sort together
        for i, g in enumerate(groups):
            if g is not None:
                h1[i] = h2[i] = _h64(f"\0group\0{g}")
    is_val = np.zeros(len(class_ids), dtype=bool)
    for c in np.unique(class_ids[class_ids >= 0]):
        rows = np.flatnonzero(class_ids == c)
        n = len(rows)
        order = rows[np.lexsort((h2[rows], h1[rows]))]  # primary h1, then h2: a group's rows come together
        if groups is None:
            if n >= 2:
                is_val[order[:min(max(1, int(round(fraction * n))), n - 1)]] = True
            continue
        _, starts = np.unique(np.stack([h1[order], h2[order]], 1), axis=0, return_index=True)
        starts = np.sort(starts)  # where each group begins in ``order``
        if len(starts) < 2:
            continue
        want = max(1, int(round(fraction * n)))
        # whole groups, in hash order, until they hold ``want`` rows; never the last group
        ends = np.append(starts[1:], n)
        n_groups = min(int(np.searchsorted(ends, want)) + 1, len(starts) - 1)
        is_val[order[:ends[n_groups - 1]]] = True
    return is_val


@dataclass
class Labeled:
    """Labelled features in memory: rows with a label only."""

    keys: list[str]
    shards: list[str]
    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int64 class ids [N]
    raw: list[Any]  # the labels as found


def check_group_column(files: Sequence[Path], group: LabelSource) -> None:
    for f in files:
        names = pq.read_schema(f).names
        if group.column not in names:
            raise UserError(f"{f}: no column {group.column!r} for --group-field {group.field} (columns: "
                            f"{', '.join(names)}); embed with --keep json, or drop --group-field")


def _name_columns(files: Sequence[Path], source: LabelSource, scan: NameScan | None) -> list[str]:
    """The name columns every file has, when the labels may need names (the integer ``label`` column)."""
    if scan is None or source.column != "label":
        return []
    schemas = [set(pq.read_schema(f).names) for f in files]
    return [c for c in scan.columns_in(sorted(set.intersection(*schemas)))] if schemas else []


def load_labeled(path: Path | str, source: LabelSource, group: LabelSource | None = None,
                 scan: NameScan | None = None) -> tuple[store.Batch, list[Any], list[Any] | None]:
    """Every row under ``path``, its raw label (None where missing) and its ``group`` value (None without one);
    the rows' names for their labels go to ``scan``."""
    files = store.list_shards(path)
    check_label_column(files, source)
    if group is not None:
        check_group_column(files, group)
    names = _name_columns(files, source, scan)
    extra = list(dict.fromkeys([c for c in (source.column, group.column if group else "label") if c != "label"]
                               + names))
    batch = store.read_all(path, files=files, columns=extra)
    raw = source.values(batch_columns(batch, source), len(batch.keys))
    feed_names(scan, raw, {c: batch.extra[c] for c in names})
    groups = group.values(batch_columns(batch, group), len(batch.keys)) if group is not None else None
    return batch, raw, groups


def select(batch: store.Batch, raw: list[Any], class_ids: np.ndarray, mask: np.ndarray) -> Labeled:
    idx = np.flatnonzero(mask)
    return Labeled(
        keys=[batch.keys[i] for i in idx],
        shards=[batch.shards[i] for i in idx],
        x=batch.embeddings[idx],
        y=class_ids[idx],
        raw=[raw[i] for i in idx],
    )


def check_classes(cmap: ClassMap, path: Path | str, source: LabelSource, n_rows: int) -> None:
    if len(cmap) == 0:
        raise UserError(
            f"no labels found in {path} (label source {source.describe()!r}, {n_rows} rows); embed shards "
            "that carry .cls files, or point --label-column/--label-field at the label"
        )
    if len(cmap) < 2:
        raise UserError(
            f"only one class ({cmap.names[0]!r}) in {path}; a classifier needs at least two distinct labels"
        )


@dataclass
class Split:
    """Class ids and set membership of training rows (and of a separate validation folder's rows, if given)."""

    cmap: ClassMap
    train_ids: np.ndarray  # class id per training-folder row, -1 for unlabelled
    train_mask: np.ndarray  # training rows
    val_ids: np.ndarray  # class id per validation row (the training folder's rows without --val)
    val_mask: np.ndarray  # validation rows
    info: dict[str, Any]


def split_rows(keys: Sequence[str], shards: Sequence[str], raw: Sequence[Any], source: LabelSource, where: Path | str,
               val_raw: Sequence[Any] | None = None, val_where: Path | str | None = None,
               val_fraction: float = VAL_FRACTION, groups: Sequence[Any] | None = None,
               group: LabelSource | None = None) -> Split:
    """The split policy, the same for in-memory and streamed probes and for k-NN.

    Classes come from the training labels. Without a validation folder, a stratified key-hash split of the
    training rows (:func:`stable_split`), keeping each group's rows on one side when ``groups`` gives each row's
    ``group`` value (``--group-field``: the variants of one photo); with one, all its rows whose label is a
    training class (the others are left out, with a warning). Rows without a label are in neither set (with a
    warning).
    """
    cmap = ClassMap.from_labels(raw)
    check_classes(cmap, where, source, len(raw))
    ids = cmap.encode(raw)
    info: dict[str, Any] = {"unlabelled": sum(v is None for v in raw)}
    if val_raw is None:
        is_val = stable_split(keys, ids, val_fraction, shards, groups)
        train_mask, val_ids, val_mask = (ids >= 0) & ~is_val, ids, is_val
        info.update(method="key-hash", fraction=val_fraction, hash="blake2b-64")
        if groups is not None:
            info.update(method="group-hash", group=group.describe() if group else None,
                        ungrouped=sum(g is None for g, i in zip(groups, ids) if i >= 0))
            if info["ungrouped"]:
                log.warning("%d labelled rows of %s have no %s value: each is a group of its own", info["ungrouped"],
                            where, info["group"])
    else:
        val_ids = cmap.encode(val_raw)
        unseen = sum(1 for v, i in zip(val_raw, val_ids) if v is not None and i < 0)
        if unseen:
            log.warning("%d validation rows have labels absent from training; they are left out", unseen)
        train_mask, val_mask = ids >= 0, val_ids >= 0
        info.update(method="folder", val=str(val_where), unseen_val_labels=unseen)
    if not val_mask.any():
        counts = np.bincount(ids[ids >= 0], minlength=len(cmap))
        if val_raw is None and counts.max(initial=0) < 2:
            raise UserError(f"every class in {where} has a single example (label source {source.describe()!r}, "
                            f"{len(cmap)} classes), so none can be held out for validation; a probe needs classes "
                            "with several examples: point --label-column/--label-field at a real label")
        raise UserError("the validation set is empty; pass --val EMB_DIR or a larger --val-fraction")
    if info["unlabelled"]:
        log.warning("%d rows of %s have no label and are left out", info["unlabelled"], where)
    info.update(train=int(train_mask.sum()), val=int(val_mask.sum()))
    return Split(cmap, ids, train_mask, val_ids, val_mask, info)


def load_split(
    train_path: Path | str,
    source: LabelSource,
    val_path: Path | str | None = None,
    val_fraction: float = VAL_FRACTION,
    group: LabelSource | None = None,
    class_names: str | Path | None = None,
) -> tuple[Labeled, Labeled, ClassMap, dict[str, Any]]:
    """Train and validation sets in memory, with the class map (built from the training labels, named from their
    rows or ``class_names``); see :func:`split_rows`."""
    scan = NameScan()
    batch, raw, groups = load_labeled(train_path, source, None if val_path else group, scan)
    vbatch, vraw = (batch, None) if val_path is None else load_labeled(val_path, source)[:2]
    if vbatch.embeddings.shape[1] != batch.embeddings.shape[1]:
        raise UserError(f"--val {val_path} has dim {vbatch.embeddings.shape[1]}, {train_path} has "
                        f"{batch.embeddings.shape[1]}; embed both with the same model")
    s = split_rows(batch.keys, batch.shards, raw, source, train_path, vraw, val_path, val_fraction, groups, group)
    train = select(batch, raw, s.train_ids, s.train_mask)
    val = select(vbatch, raw if vraw is None else vraw, s.val_ids, s.val_mask)
    cmap, s.info["class_names"] = s.cmap.named(scan, class_names)
    return train, val, cmap, s.info


def scan_labels(files: Sequence[Path], source: LabelSource, group: LabelSource | None = None,
                scan: NameScan | None = None) -> tuple[list[str], list[str], list[Any], list[int], list[Any] | None]:
    """Keys, shard names, raw labels and ``group`` values (None without one) of every row, reading only those
    columns (no embeddings), and the rows' names for their labels into ``scan``.

    Returns the per-file row counts too, so streamed batches can be matched back to rows.
    """
    check_label_column(files, source)
    if group is not None:
        check_group_column(files, group)
    keys: list[str] = []
    shards: list[str] = []
    raw: list[Any] = []
    counts: list[int] = []
    groups: list[Any] | None = [] if group is not None else None
    for f in files:
        names = _name_columns([f], source, scan)
        cols = list(dict.fromkeys(["key", "shard", source.column, *([group.column] if group else []), *names]))
        t = pq.read_table(f, columns=cols)
        data = {c: t.column(c).to_pylist() for c in cols}
        keys += data["key"]
        shards += data["shard"]
        labels = source.values(data, t.num_rows)
        raw += labels
        feed_names(scan, labels, {c: data[c] for c in names})
        if groups is not None and group is not None:
            groups += group.values(data, t.num_rows)
        counts.append(t.num_rows)
    return keys, shards, raw, counts, groups


@dataclass
class StreamSet:
    """Rows of some Parquet files chosen by a mask, with their class ids, read batch by batch."""

    files: list[Path]
    counts: list[int]
    ids: np.ndarray  # class id per row over all files, -1 for unlabelled
    mask: np.ndarray  # rows that belong to this set

    def __len__(self) -> int:
        return int(self.mask.sum())

    def batches(self, batch_size: int = 65536, file_order: Sequence[int] | None = None):
        """Yield ``(x float32 [n, D], y int64 [n])`` for the selected rows, one Parquet batch at a time."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        order = list(file_order) if file_order is not None else range(len(self.files))
        for fi in order:
            if not self.mask[starts[fi]:starts[fi + 1]].any():
                continue
            off = int(starts[fi])
            for b in store.iter_batches(None, batch_size=batch_size, files=[self.files[fi]]):
                n = len(b.keys)
                m = self.mask[off:off + n]
                if m.any():
                    yield b.embeddings[m], self.ids[off:off + n][m]
                off += n


def plan_stream(
    train_path: Path | str, source: LabelSource, val_path: Path | str | None = None, val_fraction: float = VAL_FRACTION,
    group: LabelSource | None = None, class_names: str | Path | None = None,
) -> tuple[StreamSet, StreamSet, ClassMap, dict[str, Any]]:
    """Like :func:`load_split`, but keeps only labels and masks in memory; features are streamed later."""
    files = store.list_shards(train_path)
    store.check_consistent([store.shard_info(f) for f in files])
    scan = NameScan()
    keys, shards, raw, counts, groups = scan_labels(files, source, None if val_path else group, scan)
    vfiles, vraw, vcounts = files, None, counts
    if val_path is not None:
        vfiles = store.list_shards(val_path)
        _, _, vraw, vcounts, _ = scan_labels(vfiles, source)
    s = split_rows(keys, shards, raw, source, train_path, vraw, val_path, val_fraction, groups, group)
    train = StreamSet(files, counts, s.train_ids, s.train_mask)
    val = StreamSet(vfiles, vcounts, s.val_ids, s.val_mask)
    cmap, s.info["class_names"] = s.cmap.named(scan, class_names)
    return train, val, cmap, s.info
