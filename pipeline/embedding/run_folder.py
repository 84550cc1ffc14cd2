"""An embed output folder: every name in it, run.json and its fingerprint, the lock, done/failed records, _SUCCESS.

    OUT/embeddings/<name>.parquet   the shard's embeddings (``store``'s format)
    OUT/_state/<name>.json          done record, written after the Parquet file is in place
    OUT/_state/<name>.failed.json   why the shard failed (removed once it succeeds)
    OUT/run.json                    the resolved config and the fingerprint of the embeddings
    OUT/_SUCCESS                    every shard of the run is done
    OUT/_lock, OUT/_lock.R-of-W     the owner of the folder (one per rank when ranks share it)
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import atomic, store
from ..errors import UserError
from .shards import same_url

log = logging.getLogger(__name__)

EMBEDDINGS = store.EMBEDDINGS
STATE_DIR = "_state"
RUN_JSON = "run.json"
SUCCESS = "_SUCCESS"
LOCK = "_lock"
DONE_SUFFIX = ".json"
FAILED_SUFFIX = ".failed.json"


def lock_name(rank: int = 0, world: int = 1) -> str:
    """The lock file of one rank: ``_lock`` when one process owns the folder, ``_lock.R-of-W`` per rank otherwise."""
    return LOCK if world == 1 else f"{LOCK}.{rank}-of-{world}"


def is_run_folder(path: Path) -> bool:
    return (Path(path) / RUN_JSON).is_file()


def records(out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Done and failed records of a folder, by output name."""
    state = Path(out) / STATE_DIR
    done, failed = {}, {}
    for p in sorted(state.glob(f"*{DONE_SUFFIX}")) if state.is_dir() else []:
        if p.name.endswith(FAILED_SUFFIX):
            failed[p.name[: -len(FAILED_SUFFIX)]] = p
        else:
            done[p.name[: -len(DONE_SUFFIX)]] = p
    return done, failed


@dataclass
class ShardRecord:
    url: str
    output: str
    seen: int
    embedded: int
    skipped: list[dict[str, str]]
    seconds: float


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunState:
    """Everything a run knows about ``out`` lives in files there, so any process can resume it."""

    def __init__(self, out: Path, rank: int = 0, world: int = 1):
        self.out = Path(out)
        self.emb_dir = self.out / EMBEDDINGS
        self.state_dir = self.out / STATE_DIR
        self.run_json = self.out / RUN_JSON
        self.lock = self.out / lock_name(rank, world)
        self.owns_folder = world == 1  # one rank: the folder's own files (run.json, _SUCCESS) are its alone
        self._locked = False

    # -- ownership -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """One writer per folder: a lock file with pid, host and scheduler task; a dead owner's lock is taken over.

        Dead means: on this host and its pid is gone, or an earlier attempt of this very scheduler task
        (:func:`pipeline.embedding.cluster.task_identity`), e.g. a Slurm array task requeued onto another node.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        from .cluster import task_identity

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "task": task_identity()}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.lock.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    log.warning("taking over the stale lock %s of dead pid %s", self.lock, owner.get("pid"))
                    self.lock.unlink(missing_ok=True)
                    continue
                same_host_alive = owner.get("host") == me["host"] and _pid_alive(int(owner.get("pid", -1)))
                if me["task"] and owner.get("task") == me["task"] and not same_host_alive:
                    # The scheduler runs one attempt of a task at a time: this is a requeued/retried task
                    # (maybe on another node) and the lock is its killed predecessor's.
                    log.warning("taking over the lock %s of an earlier attempt of task %s (pid %s on %s)",
                                self.lock, me["task"], owner.get("pid"), owner.get("host"))
                    self.lock.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"{self.out} is in use by another embedpipe run (pid {owner.get('pid')} on "
                    f"{owner.get('host')}); wait for it to finish, or delete {self.lock} if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise UserError(f"cannot take the lock {self.lock}; delete it if no run is using {self.out}")

    def release(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    def claim(self, fingerprint: dict[str, Any], config: dict[str, Any], overwrite: bool) -> None:
        """Lock the folder and check it holds embeddings of this model/preprocessing (or wipe it with overwrite)."""
        self.acquire()
        try:
            run_json = self.run_json
            if run_json.is_file():
                old = json.loads(run_json.read_text()).get("fingerprint", {})
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                if diff and not overwrite:
                    detail = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff[:4])
                    raise UserError(
                        f"{self.out} holds embeddings made with different settings ({detail}). "
                        "Use another --out folder, or --overwrite to delete them and start again"
                    )
                if diff:
                    log.warning("--overwrite: deleting the embeddings in %s", self.out)
                    shutil.rmtree(self.emb_dir, ignore_errors=True)
                    shutil.rmtree(self.state_dir, ignore_errors=True)
            (self.out / SUCCESS).unlink(missing_ok=True)
            atomic.write_json(run_json, {"fingerprint": fingerprint, "config": config})
        except BaseException:
            self.release()
            raise

    def same_options(self, config: dict[str, Any], keys: Sequence[str]) -> bool:
        """Whether ``run.json`` records these values of ``keys`` (False when there is no readable run.json)."""
        try:
            recorded = json.loads(self.run_json.read_text()).get("config", {})
        except (OSError, ValueError):
            return False
        norm = (lambda v: list(v) if isinstance(v, tuple) else v)  # noqa: E731  (JSON has no tuples)
        return all(k in recorded and norm(recorded[k]) == norm(config.get(k)) for k in keys)

    # -- per shard ---------------------------------------------------------------------------------
    def _done_path(self, name: str) -> Path:
        return self.state_dir / f"{name}{DONE_SUFFIX}"

    def _failed_path(self, name: str) -> Path:
        return self.state_dir / f"{name}{FAILED_SUFFIX}"

    def remove_stale_temps(self, names: Sequence[str]) -> None:
        """Temporary files a killed run left for these shards (this rank's own; with one rank, the folder's too)."""
        atomic.remove_stale_temps(self.emb_dir, [f"{n}.parquet" for n in names])
        atomic.remove_stale_temps(self.state_dir, [f"{n}{x}" for n in names for x in (DONE_SUFFIX, FAILED_SUFFIX)])
        if self.owns_folder:
            atomic.remove_stale_temps(self.out, [RUN_JSON, SUCCESS])

    def is_done(self, url: str, name: str) -> bool:
        p = self._done_path(name)
        if not p.is_file() or not (self.emb_dir / f"{name}.parquet").is_file():
            return False
        try:
            return same_url(json.loads(p.read_text()).get("url"), url)
        except (OSError, json.JSONDecodeError):
            return False

    def commit(self, url: str, name: str, *, keys: Sequence[str], indices: Sequence[int],
               labels: Sequence[int | None], embeddings: np.ndarray, extra: dict[str, list[str | None]],
               metadata: dict[str, Any], seen: int, skipped: Sequence[tuple[str, str]], seconds: float) -> ShardRecord:
        """Parquet file first (atomic), then the done record: a shard with a record is always complete."""
        table = store.embedding_table(keys, url, indices, labels, embeddings, metadata["dtype"], extra, metadata)
        store.write_table(self.emb_dir / f"{name}.parquet", table)
        record = {"url": url, "output": f"{EMBEDDINGS}/{name}.parquet", "seen": seen, "embedded": len(keys),
                  "skipped": [{"key": k, "reason": r} for k, r in skipped], "seconds": round(seconds, 3),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_json(self._done_path(name), record)
        self._failed_path(name).unlink(missing_ok=True)
        return ShardRecord(url, record["output"], seen, len(keys), record["skipped"], seconds)

    def record_failure(self, url: str, name: str, reason: str) -> None:
        """Write ``_state/<name>.failed.json``; on a full disk the failure is still in the summary and exit status."""
        try:
            atomic.write_json(self._failed_path(name), {"url": url, "reason": reason,
                                                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as e:
            log.error("cannot record the failure of %s (%s): %s", url, reason, e)

    def mark_success(self) -> None:
        atomic.write_bytes(self.out / SUCCESS, b"")


def status(out: Path | str) -> dict[str, Any]:
    """Done, failed and pending shards of an output folder, with sample counts."""
    out = Path(out)
    if not is_run_folder(out):
        raise UserError(f"{out} is not an embedpipe output folder (no {RUN_JSON}); pass the --out of `embedpipe embed`")
    expected = json.loads((out / RUN_JSON).read_text()).get("config", {}).get("shards", 0)
    done_paths, failed_paths = records(out)
    done = [json.loads(p.read_text()) for p in done_paths.values()]
    failed = [json.loads(p.read_text()) for p in failed_paths.values()]
    return {
        "shards_expected": expected, "done": len(done), "failed": len(failed),
        "pending": max(0, expected - len(done)),
        "embedded": sum(r["embedded"] for r in done), "skipped": sum(len(r["skipped"]) for r in done),
        "failed_shards": {r["url"]: r["reason"] for r in failed}, "success": (out / SUCCESS).is_file(),
    }
