"""Shard specs -> shard urls (paths, globs, brace ranges, @lists, URLs); stable output names; partitioning."""
from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

from braceexpand import braceexpand

from ..errors import UserError

_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand(specs: Iterable[str]) -> list[str]:
    """Expand shard specs in order, dropping repeats.

    ``data/s-{000..009}.tar`` (brace ranges), ``data/*.tar`` (globs), ``@list.txt`` (one spec a line,
    ``#`` comments), and URLs (``pipe:…``, ``http://…``, ``s3://…``) passed through. A local path that
    does not exist is kept: it fails as a shard, so the run says which one was missing.

    Example:
        >>> expand(["a-{0..2}.tar"])
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
            if is_url(item) or not glob.has_magic(item):
                out.append(item)
                continue
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"no shards match {item!r}; did the pattern match? (quote it so the shell leaves it alone)")
            out.extend(matches)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


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


def output_names(urls: Sequence[str]) -> dict[str, str]:
    """Stable, unique output stems: the shard's own stem, plus a hash of its url where two stems collide."""
    stems = [stem(u) for u in urls]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return {
        u: s if counts[s] == 1 else f"{s}-{hashlib.sha1(u.encode()).hexdigest()[:8]}" for u, s in zip(urls, stems)
    }


def partition(shards: Sequence[str], rank: int, world: int) -> list[str]:
    """Shards for one of ``world`` workers: a pure function of the sorted list, each shard in exactly one part.

    Example:
        >>> partition(["c", "a", "b", "d"], 1, 2)
        ['b', 'd']
    """
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"rank {rank} is not in [0, world size {world})")
    return sorted(shards)[rank::world]
