"""Classes: the class map (labels <-> class ids) and the classes' names. Integer labels are named from a column
that names each label consistently (the sample's ``json`` label, its ``txt``) or from a ``--class-names`` file;
else they stay numbers, and the log says why."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

# Where a sample may name its integer label, tried in this order: the json ``label`` field (sklearn digits,
# the photos sample data), then the txt column (a label's name, in datasets that write one per sample).
NAME_COLUMNS = (("json", "label"), ("txt", None))


def describe(column: str, field: str | None) -> str:
    return f"{column}.{field}" if field else column


class NameScan:
    """The label -> name maps of each name column, kept while one-to-one over the rows fed (:meth:`add`)."""

    def __init__(self) -> None:
        self.maps: dict[tuple[str, str | None], dict[Any, str]] = {c: {} for c in NAME_COLUMNS}
        self.broken: dict[tuple[str, str | None], str] = {}
        self.seen: set[str] = set()  # name columns present in some file
        self.rows = 0

    def columns_in(self, names: Sequence[str]) -> list[str]:
        """The name columns among a file's ``names`` (to read alongside the labels)."""
        return [c for c in dict.fromkeys(col for col, _ in NAME_COLUMNS) if c in names]

    def add(self, labels: Sequence[Any], named: Mapping[tuple[str, str | None], Sequence[Any]]) -> None:
        """Rows of ``labels`` with the names each present name column gives them (``named``: (column, field) ->
        one value per row, None where the row has none; ``labels.feed_names`` reads them)."""
        self.rows += sum(v is not None for v in labels)
        for candidate, values in named.items():
            self.seen.add(candidate[0])
            if candidate in self.broken:
                continue
            names = self.maps[candidate]
            by_name = {n: lab for lab, n in names.items()}
            for label, value in zip(labels, values):
                name = str(value).strip() if label is not None and value is not None else ""
                if not name:
                    continue
                if names.setdefault(label, name) != name:
                    self.broken[candidate] = f"label {label} is named both {names[label]!r} and {name!r}"
                    break
                if by_name.setdefault(name, label) != label:
                    self.broken[candidate] = f"{name!r} names both label {by_name[name]} and label {label}"
                    break

    def names_for(self, classes: Sequence[Any]) -> tuple[list[str] | None, str]:
        """The first name column that names every class one-to-one, and where the names came from (or why none)."""
        why = []
        for candidate in NAME_COLUMNS:
            where = describe(*candidate)
            if candidate[0] not in self.seen:
                why.append(f"no {candidate[0]} column")
            elif candidate in self.broken:
                why.append(f"{where}: {self.broken[candidate]}")
            elif any(c not in self.maps[candidate] for c in classes):
                missing = [c for c in classes if c not in self.maps[candidate]]
                why.append(f"{where} names no row of label {missing[0]}" + (f" (nor {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
            else:
                return [self.maps[candidate][c] for c in classes], where
        return None, "; ".join(why)


def read_names_file(path: str | Path, classes: Sequence[Any]) -> list[str]:
    """``--class-names FILE``: one name per line (line i names label i), a JSON list (the same), or a JSON object
    mapping each label to its name; every class must be named, each name once."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--class-names {p} does not exist; give a file of one name per line (line i names label "
                        "i), or a JSON object {\"<label>\": \"<name>\", ...}")
    text = p.read_text(encoding="utf-8")
    mapping: dict[str, Any]
    if p.suffix == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--class-names {p} is not valid JSON ({e})") from None
        if isinstance(data, list):
            mapping = {str(i): v for i, v in enumerate(data)}
        elif isinstance(data, dict):
            mapping = {str(k): v for k, v in data.items()}
        else:
            raise UserError(f"--class-names {p}: expected a JSON list or object, found {type(data).__name__}")
        positional = isinstance(data, list)
    else:
        mapping = {str(i): line.strip() for i, line in enumerate(text.splitlines())}
        positional = True
    if positional and any(not isinstance(c, int) for c in classes):
        raise UserError(f"--class-names {p} names labels by position, but the labels are not integers "
                        f"(e.g. {next(c for c in classes if not isinstance(c, int))!r}); use a JSON object "
                        "{\"<label>\": \"<name>\", ...}")
    names = [str(mapping[str(c)]).strip() if str(c) in mapping and mapping[str(c)] is not None else ""
             for c in classes]
    unnamed = [c for c, n in zip(classes, names) if not n]
    if unnamed:
        raise UserError(f"--class-names {p} names no label {unnamed[0]!r}" + (f" (nor {len(unnamed) - 1} more)"
                        if len(unnamed) > 1 else "") + f"; the labels are {', '.join(map(str, classes[:20]))}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--class-names {p} gives {twice[0]!r} to more than one label; each class needs its own name")
    return names


def name_classes(classes: Sequence[Any], scan: NameScan | None, names_file: str | Path | None
                 ) -> tuple[list[str] | None, str]:
    """Names of ``classes`` (None: their labels as they are) and where they came from, logged.

    A ``--class-names`` file wins; string labels are their own names; integer labels take the first name column
    that names every class, one name per label and one label per name, across every row read; else they stay
    numbers, and the log says why.
    """
    if names_file is not None:
        names, where = read_names_file(names_file, classes), f"--class-names {names_file}"
    elif not all(isinstance(c, int) for c in classes):
        return None, "the labels"
    elif scan is None:
        return None, "the labels"
    else:
        names, where = scan.names_for(classes)
        if names is None:
            log.info("class names: the integer labels (%s); pass --class-names FILE to name them", where)
            return None, f"the labels ({where})"
    log.info("class names from %s: %s", where, ", ".join(f"{c}={n}" for c, n in list(zip(classes, names))[:10])
             + (", ..." if len(classes) > 10 else ""))
    return names, where


@dataclass(frozen=True)
class ClassMap:
    """Sorted distinct labels <-> contiguous class ids 0..C-1, and the classes' names (default: the labels)."""

    classes: list[Any]
    display: tuple[str, ...] | None = None  # one name per class, when the labels are numbers (class_names.py)

    @classmethod
    def from_labels(cls, labels: Sequence[Any]) -> "ClassMap":
        present = {v for v in labels if v is not None}
        if any(isinstance(v, str) for v in present):
            present = {str(v) for v in present}
        return cls(sorted(present))

    @property
    def names(self) -> list[str]:
        return list(self.display) if self.display else [str(c) for c in self.classes]

    def named(self, scan: NameScan | None, names_file: str | Path | None) -> tuple["ClassMap", str]:
        """This map with its classes' names (``class_names.name_classes``), and where they came from."""
        names, where = name_classes(self.classes, scan, names_file)
        return ClassMap(self.classes, tuple(names) if names else None), where

    def __len__(self) -> int:
        return len(self.classes)

    def encode(self, labels: Sequence[Any]) -> np.ndarray:
        """Class ids, with -1 for missing labels and labels not in the map."""
        as_str = bool(self.classes) and isinstance(self.classes[0], str)
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array(
            [-1 if v is None else index.get(str(v) if as_str else v, -1) for v in labels], dtype=np.int64
        )
