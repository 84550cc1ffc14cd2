"""An output folder's state: run.json and its fingerprint, the lock, per-shard done/failed records, _SUCCESS."""
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

from . import store
from .errors import UserError

log = logging.getLogger(__name__)


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

    def __init__(self, out: Path, lock_name: str = "_lock"):
        self.out = Path(out)
        self.emb_dir = self.out / store.EMBEDDINGS
        self.state_dir = self.out / store.STATE
        self.lock = self.out / lock_name  # one per rank when several ranks share a folder
        self._locked = False

    # -- ownership -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """One writer per folder: a lock file with pid, host and scheduler task; a dead owner's lock is taken over.

        Dead means: on this host and its pid is gone, or an earlier attempt of this very scheduler task
        (:func:`pipeline.cluster.task_identity`), e.g. a Slurm array task requeued onto another node.
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
            run_json = self.out / "run.json"
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
            (self.out / "_SUCCESS").unlink(missing_ok=True)
            store.atomic_write_json(run_json, {"fingerprint": fingerprint, "config": config})
        except BaseException:
            self.release()
            raise

    # -- per shard ---------------------------------------------------------------------------------
    def _done_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _failed_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.failed.json"

    def is_done(self, url: str, name: str) -> bool:
        p = self._done_path(name)
        if not p.is_file() or not (self.emb_dir / f"{name}.parquet").is_file():
            return False
        try:
            return json.loads(p.read_text()).get("url") == url
        except (OSError, json.JSONDecodeError):
            return False

    def commit(self, url: str, name: str, *, keys: Sequence[str], indices: Sequence[int],
               labels: Sequence[int | None], embeddings: np.ndarray, extra: dict[str, list[str | None]],
               metadata: dict[str, Any], seen: int, skipped: Sequence[tuple[str, str]], seconds: float) -> ShardRecord:
        """Parquet file first (atomic), then the done record: a shard with a record is always complete."""
        table = store.embedding_table(keys, url, indices, labels, embeddings, metadata["dtype"], extra, metadata)
        store.write_table_atomic(self.emb_dir / f"{name}.parquet", table)
        record = {"url": url, "output": f"{store.EMBEDDINGS}/{name}.parquet", "seen": seen, "embedded": len(keys),
                  "skipped": [{"key": k, "reason": r} for k, r in skipped], "seconds": round(seconds, 3),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        store.atomic_write_json(self._done_path(name), record)
        self._failed_path(name).unlink(missing_ok=True)
        return ShardRecord(url, record["output"], seen, len(keys), record["skipped"], seconds)

    def record_failure(self, url: str, name: str, reason: str) -> None:
        """Write ``_state/<name>.failed.json``; on a full disk the failure is still in the summary and exit status."""
        try:
            store.atomic_write_json(self._failed_path(name), {"url": url, "reason": reason,
                                                              "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as e:
            log.error("cannot record the failure of %s (%s): %s", url, reason, e)

    def mark_success(self) -> None:
        store.atomic_write_bytes(self.out / "_SUCCESS", b"")


def status(out: Path | str) -> dict[str, Any]:
    """Done, failed and pending shards of an output folder, with sample counts."""
    out = Path(out)
    run_json = out / "run.json"
    if not run_json.is_file():
        raise UserError(f"{out} is not an embedpipe output folder (no run.json); pass the --out of `embedpipe embed`")
    expected = json.loads(run_json.read_text()).get("config", {}).get("shards", 0)
    done, failed = [], []
    for p in sorted((out / store.STATE).glob("*.json")):
        rec = json.loads(p.read_text())
        (failed if p.name.endswith(".failed.json") else done).append(rec)
    return {
        "shards_expected": expected, "done": len(done), "failed": len(failed),
        "pending": max(0, expected - len(done)),
        "embedded": sum(r["embedded"] for r in done), "skipped": sum(len(r["skipped"]) for r in done),
        "failed_shards": {r["url"]: r["reason"] for r in failed}, "success": (out / "_SUCCESS").is_file(),
    }
