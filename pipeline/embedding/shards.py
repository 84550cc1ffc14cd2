"""Shard specs -> shard urls (paths, folders, globs, brace ranges, @lists, URLs); stable output names; partitioning."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from braceexpand import braceexpand

from ..errors import UserError

log = logging.getLogger(__name__)

_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
# Files that sit beside shards (img2dataset writes NNNNN.parquet, NNNNN_stats.json, ...) and are never shards.
_SIDECARS = (".parquet", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".feather", ".arrow", ".npy", ".npz", ".log", ".md")


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def is_shard_name(path: str) -> bool:
    return path.endswith(_SUFFIXES)


def expand(specs: Iterable[str]) -> list[str]:
    """Expand shard specs in order, dropping repeats; local shards become absolute paths.

    ``data/s-{000..009}.tar`` (brace ranges), ``data/*.tar`` (globs), ``data/`` (a folder: its tar shards, e.g.
    img2dataset's output), ``@list.txt`` (one spec a line, ``#`` comments), and URLs (``pipe:…``, ``http://…``,
    ``s3://…``) passed through as given. Files a glob or folder holds besides shards (``.parquet``,
    ``_stats.json``, ...) are skipped with one log line; such a file named explicitly is an error. A local path
    that does not exist is kept: it fails as a shard, so the run says which one was missing.

    Example:
        >>> [Path(u).name for u in expand(["a-{0..2}.tar"])]
        ['a-0.tar', 'a-1.tar', 'a-2.tar']
    """
    out: list[str] = []
    for spec in specs:
        if spec.startswith("@"):
            listing = Path(spec[1:])
            if not listing.is_file():
                raise UserError(f"shard list {listing} does not exist")
            lines = [ln.split("#", 1)[0].strip() for ln in listing.read_text().splitlines()]
            out.extend(expand([ln for ln in lines if ln]))
            continue
        for item in braceexpand(spec):
            if is_url(item):
                out.append(item)
            elif os.path.isdir(item):
                out.extend(_shards_in(sorted(str(p) for p in Path(item).iterdir()), f"the folder {item}"))
            elif glob.has_magic(item):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise UserError(f"no shards match {item!r}; did the pattern match? (quote it so the shell leaves it alone)")
                out.extend(_shards_in(matches, repr(item)))
            else:
                if item.endswith(_SIDECARS) and os.path.isfile(item):
                    raise UserError(f"{item} is not a tar shard (a {Path(item).suffix} file); pass the .tar shards, "
                                    "a glob of them or the folder holding them")
                out.append(os.path.abspath(item))
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


def _shards_in(paths: list[str], where: str) -> list[str]:
    """The tar shards among ``paths`` (absolute), saying in one line what else was there."""
    shards = [os.path.abspath(p) for p in paths if is_shard_name(p) and os.path.isfile(p)]
    other = [Path(p).name for p in paths if not (is_shard_name(p) and os.path.isfile(p))]
    if not shards:
        raise UserError(f"no tar shards (*.tar, *.tar.gz) in {where}: it holds {len(other)} other entries "
                        f"(e.g. {', '.join(other[:3]) or 'nothing'})")
    if other:
        log.info("%s: %d tar shards; %d other entries skipped (e.g. %s)", where, len(shards), len(other),
                 ", ".join(other[:3]))
    return shards


def sample_count(url: str) -> int | None:
    """Samples in a local shard as its img2dataset sidecar ``<stem>_stats.json`` counts them (``successes``);
    None when there is no such file (a progress total, never a check)."""
    if is_url(url) or not is_shard_name(url):
        return None
    base = url
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    try:
        value = json.loads(Path(f"{base}_stats.json").read_text()).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def same_url(recorded: str, url: str) -> bool:
    """A done record's url names this shard: equal, or a relative local path (older records) to the same file."""
    return recorded == url or (not is_url(recorded) and os.path.abspath(recorded) == url)


def stem(url: str) -> str:
    """The file-name stem of a shard url: ``/d/shard-001.tar.gz`` -> ``shard-001``; safe as a file name."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    name = last.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return name or "shard"


def output_names(urls: Sequence[str], recorded: dict[str, str] | None = None) -> dict[str, str]:
    """Output stems, unique and stable from run to run: a function of the url and the folder's records.

    A url keeps the name a record (``recorded``: name -> url) already gives it. Otherwise it gets its shard's
    stem, unless the stem is contested (another url of this list has it, or a record gives it to another url):
    then ``stem-<sha1(url)[:8]>``. So a shard embedded once never changes name (and is never embedded again
    under another) when a same-named shard from another folder joins a later run.

    Example:
        >>> output_names(["/a/s.tar", "/b/t.tar"], {"s": "/a/s.tar"})
        {'/a/s.tar': 's', '/b/t.tar': 't'}
    """
    owner = {name: u if is_url(u) else os.path.abspath(u) for name, u in (recorded or {}).items()}
    stems = [stem(u) for u in urls]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = {}
    for u, s in zip(urls, stems):
        hashed = f"{s}-{hashlib.sha1(u.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        if owner.get(s) == u or owner.get(hashed) == u:
            names[u] = s if owner.get(s) == u else hashed
        else:
            names[u] = hashed if counts[s] > 1 or owner.get(s, u) != u else s
    return names


def partition(shards: Sequence[str], rank: int, world: int) -> list[str]:
    """Shards for one of ``world`` workers: a pure function of the sorted list, each shard in exactly one part.

    Example:
        >>> partition(["c", "a", "b", "d"], 1, 2)
        ['b', 'd']
    """
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is not in [0, world size {world})")
    return sorted(shards)[rank::world]
