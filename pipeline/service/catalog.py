"""The indexes a service answers from, each loaded once and swapped for its new version when its directory changes.

``embedpipe index --update`` builds the new version beside the old and exchanges the two directories in one
step (``atomic.staged_dir``). A watcher thread notices the directory's new identity, loads the new version off
the request path and swaps the reference; requests that already hold the old version finish with it (its files
stay readable while open or mapped, even once removed), so no request fails because of an update.

A version is swapped in only once it has answered: its records validate, and a search for one of its stored
vectors finds that row (:func:`probe`). One that fails keeps the old version serving, is logged once and shown
in ``/healthz``; the watcher itself never stops.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..index.layout import META_FILE
from ..index.record import now
from ..index.search import Index, open_index
from .options import ServeOptions

log = logging.getLogger(__name__)


class NotFound(Exception):
    """No such index or key: a 404, with a message that says what exists."""


def stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when the directory is swapped or rewritten; None while it is missing (mid-swap fallback).

    A directory without ``index.json`` is a version too (a broken one): swaps never show a partial directory."""
    try:
        d = os.stat(path)
    except OSError:
        return None
    try:
        m = os.stat(path / META_FILE)
    except OSError:
        return (d.st_dev, d.st_ino, -1, -1, -1)
    return (d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size)


PROBE_K = 10  # an approximate index must return a stored vector's own row within this many hits


def probe(idx: Index) -> None:
    """Check that an opened index answers: its first row's key finds that row, and a search for its stored vector
    returns it within the first :data:`PROBE_K` hits (approximate indexes), or hits at least as close (duplicates
    of it; longer vectors under inner product). A UserError says what did not answer."""
    if idx.count == 0:
        return
    key = idx.ids.column("key")[0].as_py()
    if 0 not in idx.find_keys([key])[0].ids.tolist():
        raise UserError(f"{idx.path}: the key {key!r} of row 0 does not find row 0; ids.parquet is damaged: rebuild")
    try:
        x = idx.vectors(np.array([0], np.int64))
    except UserError as e:  # stored vectors gone and not reconstructible: vector queries may still work
        log.warning("%s: not probed with a search (%s)", idx.path, e)
        return
    k = min(PROBE_K, idx.count)
    res = idx.search(x, k, where="the probe's stored vector")
    hits, best = res.ids[0], float(res.scores[0, 0])
    own = float(x[0] @ x[0])  # its score against itself: inner product, or 0 as a distance
    if 0 in hits.tolist() or (best >= own - 1e-3 * own if idx.record.metric == "ip" else best <= 1e-3 * own):
        return
    raise UserError(f"{idx.path}: a search for the stored vector of row 0 (key {key!r}) did not return it in the "
                    f"first {k} hits, nor anything as close (got ids {hits[:5].tolist()}, best score {best:.4g}, "
                    f"its own {0.0 if idx.record.metric != 'ip' else own:.4g}): index.faiss does not hold the vectors "
                    "ids.parquet names; rebuild the index")


@dataclass
class Served:
    """One version of one index, as loaded: never changed after loading (a reload makes a new one)."""

    name: str
    path: Path
    index: Index
    stamp: tuple[int, ...] | None
    generation: int
    loaded_at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        """What ``GET /indexes`` says about it: from ``index.json``, never a filesystem path."""
        rec = self.index.record
        ident = rec.embedding_meta.identity if rec.embedding_meta else None
        return {"name": self.name, "count": self.index.count, "dim": self.index.dim, "kind": rec.kind,
                "factory": rec.factory, "metric": rec.metric, "model": rec.model,
                "weights": ident.weights if ident else None,
                "input_size": (ident.preprocess or {}).get("input_size") if ident else None,
                "recall@1": rec.recall_at_1, "recall@10": rec.recall_at_10,
                "search_params": dict(rec.search_params), "updated": rec.updated,
                "images": ident is not None, "texts": ident is not None and ident.text_tower is not None,
                "generation": self.generation,
                "loaded_at": round(self.loaded_at, 3)}


class Catalog:
    """Every served index by name, the current version of each, and the watcher that reloads them."""

    def __init__(self, dirs: dict[str, Path], options: ServeOptions):
        self.options = options
        self.dirs = dirs
        self.current: dict[str, Served] = {}
        self.reloads = 0
        # index name -> why its newest version is not served: {"error", "at", "serving": the generation kept}
        self.reload_errors: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, tuple[int, ...]] = {}  # a version that would not load is not retried every tick
        for name, path in dirs.items():  # all at start: a bad directory stops the service before it listens
            self.current[name] = self._load(name, path, generation=1, st=stamp(path))
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _load(self, name: str, path: Path, generation: int, st: tuple[int, ...] | None) -> Served:
        idx = open_index(path)
        idx.cache_lookups(vector_bytes=self.options.cache_mb << 20)
        probe(idx)
        log.info("loaded index %s (generation %d): %r", name, generation, idx)
        # Stored vectors read ahead while idle (up to --cache-mb): a first key query would wait ~2 s per file.
        threading.Thread(target=idx.warm_cache, name=f"embedpipe-warm-{name}", daemon=True).start()
        return Served(name, path, idx, st, generation)

    def get(self, name: str | None) -> Served:
        """The current version of ``name`` (the only index when None); UserError naming the choices otherwise."""
        if name is None:
            if len(self.current) == 1:
                return next(iter(self.current.values()))
            raise UserError(f"this service holds {len(self.current)} indexes; say which: \"index\": one of "
                            f"{sorted(self.current)}")
        try:
            return self.current[name]
        except KeyError:
            raise NotFound(f"no index named {name!r}; GET /indexes lists them: {sorted(self.current)}") from None

    def start(self) -> None:
        """Start the watcher thread (once; a no-op with ``reload_every`` 0)."""
        if self.options.reload_every > 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="embedpipe-reload", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)

    def _watch(self) -> None:
        last = ""
        while not self._stop.wait(self.options.reload_every):
            try:
                self.check()
            except Exception as e:  # the watcher outlives anything: a dead one would never reload again
                if repr(e) != last:
                    log.exception("checking the indexes for new versions failed; still watching")
                last = repr(e)

    def check(self) -> list[str]:
        """Reload every index whose directory changed; returns the names reloaded."""
        done = []
        for name, old in list(self.current.items()):
            st = stamp(old.path)
            if st is None or st == old.stamp or st == self._failed.get(name):
                continue
            try:
                new = self._load(name, old.path, old.generation + 1, st)
            except Exception as e:
                # A directory replaced by something broken (any error: a damaged file can make FAISS or Arrow raise
                # anything): keep serving the old version. Logged once per version: it is not retried.
                why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                log.warning("index %s changed but its new version cannot be served (still serving generation %d): "
                            "%s", name, old.generation, why, exc_info=not isinstance(e, (UserError, OSError)))
                self.reload_errors[name] = {"error": why, "at": now(), "serving": old.generation}
                self._failed[name] = st
                continue
            self.current[name] = new  # one reference swap; requests holding `old` finish with it
            self.reload_errors.pop(name, None)
            self.reloads += 1
            done.append(name)
            log.warning("reloaded index %s: generation %d, %d vectors (was %d)", name, new.generation,
                        new.index.count, old.index.count)
        return done
