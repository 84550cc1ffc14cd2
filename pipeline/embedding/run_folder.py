"""An embed output folder: every name in it, run.json and its fingerprint, the lock, done/failed records, _SUCCESS.

    OUT/embeddings/<name>.parquet   the shard's embeddings (``store``'s format)
    OUT/_state/<name>.json          done record, written after the Parquet file is in place, with the file's
                                    size and sha256 (a changed file is not done)
    OUT/_state/<name>.failed.json   why the shard failed (removed once it succeeds)
    OUT/_state/<name>.claim         the process embedding the shard now (one at a time, whatever the ranks)
    OUT/run.json                    the resolved config and the fingerprint of the embeddings, and how many
                                    shards the folder has been given over all its runs (``shards_in_folder``);
                                    with ``--precision auto`` on a CPU, what it resolved to (``precision_choice``)
    OUT/_SUCCESS                    every shard of the run is done
    OUT/_lock, OUT/_lock.R-of-W     the owner of the folder (one per rank when ranks share it)
    .owners.lock (in OUT, _state)   held for an instant while a dead owner's lock or claim is taken over
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import atomic, store
from ..errors import UserError
from ..records import EmbeddingMeta
from . import owners
from .options import Fingerprint
from .shards import same_url

log = logging.getLogger(__name__)

EMBEDDINGS = store.EMBEDDINGS
STATE_DIR = "_state"
RUN_JSON = "run.json"
SUCCESS = "_SUCCESS"
LOCK = "_lock"
DONE_SUFFIX = ".json"
FAILED_SUFFIX = ".failed.json"
CLAIM_SUFFIX = ".claim"
IN_FOLDER = "shards_in_folder"  # run.json: every shard the folder has been given, over all its runs
PRECISION_CHOICE = "precision_choice"  # run.json: what --precision auto resolved to here, its cosine and why


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


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record (done, failed, run.json), or None when it is missing, empty or garbled."""
    try:
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def file_check(path: Path) -> dict[str, Any]:
    """What a done record says of its Parquet file: size and sha256, plus the inode and ctime it had then
    (while those are unchanged the file was not written to since, so the rerun need not read it)."""
    st = path.stat()
    return {"bytes": st.st_size, "sha256": atomic.file_sha256(path), "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def file_mismatch(path: Path, check: dict[str, Any] | None, full: bool = False) -> str | None:
    """Why ``path`` is not the file its done record describes (None: it is, or the record predates checks).

    ``full`` reads the whole file even when its inode and ctime are as recorded (``verify``: bit rot). A write,
    truncation, copy or ``touch`` changes the ctime (which no user call can set back), so the rerun's check
    costs a stat per shard and reads only files that were touched.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return "the file is missing"
    if check is None:
        return None
    if not isinstance(check, dict):
        return "its done record's file check is garbled"
    if st.st_size != check.get("bytes"):
        return f"it has {st.st_size} bytes, its done record says {check.get('bytes')}"
    if not full and (st.st_ino, st.st_ctime_ns) == (check.get("ino"), check.get("ctime_ns")):
        return None
    if atomic.file_sha256(path) != check.get("sha256"):
        return "its content changed since it was committed (sha256 differs from its done record)"
    return None


@dataclass
class ShardRecord:
    url: str
    output: str
    seen: int
    embedded: int
    skipped: list[dict[str, str]]
    seconds: float


class RunState:
    """Everything a run knows about ``out`` lives in files there, so any process can resume it."""

    def __init__(self, out: Path, rank: int = 0, world: int = 1):
        self.out = Path(out)
        self.emb_dir = self.out / EMBEDDINGS
        self.state_dir = self.out / STATE_DIR
        self.run_json = self.out / RUN_JSON
        self.lock = self.out / lock_name(rank, world)
        self.owns_folder = world == 1  # one rank: the folder's own files (run.json, _SUCCESS) are its alone
        self.me = owners.identity()
        self._locked = False
        self._claims: set[str] = set()  # names of the shards this process holds
        self._checked: dict[str, dict[tuple, bool]] = {}  # done files judged in this run, by their stat and record

    # -- ownership -------------------------------------------------------------------------------
    def acquire(self) -> None:
        """One writer per folder (per rank): a lock file naming this process (pid, host, start time, scheduler
        task); a dead owner's lock is taken over (see :mod:`owners`), a live one's is an error naming it."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            live, dead = owners.acquire(self.lock, self.me)
        except OSError as e:  # a regular file in the path, a read-only filesystem, a full disk
            raise UserError(f"cannot write the lock {self.lock}: {e.strerror or e}; pass an --out folder on a "
                            "writable filesystem with free space") from None
        if live is not None:
            raise UserError(f"{self.out} is in use by another embedpipe run (pid {live.get('pid')} on "
                            f"{live.get('host')}); wait for it to finish, or delete {self.lock} if that run is gone")
        if dead is not None:
            log.warning("taking over the stale lock %s of dead pid %s (%s)", self.lock, dead.get("pid"), dead["gone"])
        self._locked = True

    def release(self, claims: bool = True) -> None:
        """Give back the lock, and the shard claims unless ``claims`` is False (left for the next run to see)."""
        if claims:
            self.release_claims()
        self._claims.clear()
        if self._locked:
            owners.release(self.lock, self.me)
            self._locked = False

    def check_run(self, fingerprint: Fingerprint, config: dict[str, Any], overwrite: bool,
                  names: Sequence[str] = (), precision_choice: dict[str, Any] | None = None) -> None:
        """Under the lock: check the folder holds embeddings of this model/preprocessing (or wipe it with
        overwrite), then record this run in run.json.

        ``names``: the output names of this run's shards. run.json's ``shards_in_folder`` counts them with every
        shard the folder already has (records, or the previous run.json's count): a folder fed another input set
        still knows its earlier shards (``status``). ``precision_choice``: what ``--precision auto`` resolved to
        on this machine, with the measured cosine and why (``model/auto_precision.py``), kept as it is."""
        run_json = self.run_json
        recorded: dict[str, Any] | None = None
        if run_json.is_file():
            recorded = read_record(run_json)
            if recorded is None and not overwrite:
                raise UserError(f"{run_json} is unreadable (empty or not JSON); it records how the embeddings in "
                                f"{self.out} were made: restore it, or pass --overwrite to delete them and start again")
            old, new = (recorded or {}).get("fingerprint", {}), fingerprint.to_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff and not overwrite:
                detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
                raise UserError(
                    f"{self.out} holds embeddings made with different settings ({detail}). "
                    "Use another --out folder, or --overwrite to delete them and start again"
                )
            if diff:
                self._refuse_live_claims("--overwrite would delete the shards it is embedding")
                log.warning("--overwrite: deleting the embeddings in %s", self.out)
                shutil.rmtree(self.emb_dir, ignore_errors=True)
                shutil.rmtree(self.state_dir, ignore_errors=True)
                recorded = None
        (self.out / SUCCESS).unlink(missing_ok=True)
        done, failed = records(self.out)
        before = positive_count((recorded or {}).get(IN_FOLDER))
        in_folder = max(before, len(set(names) | set(done) | set(failed)))
        record = {"fingerprint": fingerprint.to_dict(), "config": config, IN_FOLDER: in_folder}
        if precision_choice is not None:
            record[PRECISION_CHOICE] = precision_choice
        atomic.write_json(run_json, record)

    def recorded_precision(self) -> str | None:
        """The precision the folder's embeddings were made in (``run.json``'s fingerprint), or None."""
        value = ((read_record(self.run_json) or {}).get("fingerprint") or {}).get("precision")
        return value if isinstance(value, str) else None

    def recorded_precision_choice(self) -> dict[str, Any] | None:
        """``run.json``'s record of what ``--precision auto`` resolved to, or None."""
        value = (read_record(self.run_json) or {}).get(PRECISION_CHOICE)
        return value if isinstance(value, dict) else None

    def same_options(self, config: dict[str, Any], keys: Sequence[str]) -> bool:
        """Whether ``run.json`` records these values of ``keys`` (False when there is no readable run.json)."""
        recorded = (read_record(self.run_json) or {}).get("config", {})
        if not recorded:
            return False
        norm = (lambda v: list(v) if isinstance(v, tuple) else v)  # noqa: E731  (JSON has no tuples)
        return all(k in recorded and norm(recorded[k]) == norm(config.get(k)) for k in keys)

    # -- per shard ---------------------------------------------------------------------------------
    def _done_path(self, name: str) -> Path:
        return self.state_dir / f"{name}{DONE_SUFFIX}"

    def _failed_path(self, name: str) -> Path:
        return self.state_dir / f"{name}{FAILED_SUFFIX}"

    def _claim_path(self, name: str) -> Path:
        return self.state_dir / f"{name}{CLAIM_SUFFIX}"

    def remove_stale_temps(self, names: Sequence[str]) -> None:
        """Temporary files a killed run left for these shards (this rank's own; with one rank, the folder's too)."""
        atomic.remove_stale_temps(self.emb_dir, [f"{n}.parquet" for n in names])
        atomic.remove_stale_temps(self.state_dir, [f"{n}{x}" for n in names
                                                   for x in (DONE_SUFFIX, FAILED_SUFFIX, CLAIM_SUFFIX)])
        atomic.remove_stale_temps(self.out, [self.lock.name] + ([RUN_JSON, SUCCESS] if self.owns_folder else []))

    def recorded_urls(self) -> dict[str, str]:
        """Output name -> shard url of every done and failed record (the names already given to urls)."""
        done, failed = records(self.out)
        found = {}
        for name, path in [*failed.items(), *done.items()]:  # a done record wins over a stale failure
            url = (read_record(path) or {}).get("url")
            if isinstance(url, str):
                found[name] = url
        return found

    def is_done(self, url: str, name: str) -> bool:
        """A done record for this url, and its Parquet file still the one committed (size, sha256)."""
        rec = read_record(self._done_path(name))
        if rec is None or not same_url(rec.get("url"), url):
            return False
        path = self.emb_dir / f"{name}.parquet"
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        seen = (st.st_ino, st.st_ctime_ns, st.st_size, repr(rec.get("file")))
        if seen in self._checked.get(name, ()):  # judged already in this run, and unchanged since
            return self._checked[name][seen]
        why = file_mismatch(path, rec.get("file"))
        if why:
            log.warning("%s does not match its done record (%s): its shard %s is embedded again", path, why, url)
        self._checked[name] = {seen: why is None}
        return why is None

    # -- claims: one process per shard at a time, whatever the ranks and world sizes of the runs ----------
    def claim_shards(self, names: dict[str, str]) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
        """Claim shards (url -> name) before embedding them: ``(ours, held, suspects)``.

        ``held`` maps the urls another live run is embedding to its owner record (this run leaves them); the
        ``suspects`` are ours but were held by a run that died with them (their shard may be what killed it).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ours, held, suspects = [], {}, []
        for url, name in names.items():
            live, dead = owners.acquire(self._claim_path(name), self.me, durable=False)
            if live is not None:
                held[url] = live
                continue
            self._claims.add(name)
            ours.append(url)
            if dead is not None:
                log.warning("%s was being embedded by a run that died (%s)", url, dead["gone"])
                suspects.append(url)
        return ours, held, suspects

    def died_on(self, url: str, name: str) -> bool:
        """Whether this shard's last attempt killed its process (recorded failed as a crash, or claimed by a run
        that died): it is embedded in a child process, so that a crash it causes again is contained."""
        if (read_record(self._failed_path(name)) or {}).get("crashed"):
            return True
        try:
            raw = self._claim_path(name).read_bytes()
        except FileNotFoundError:
            return False
        return owners.judge(self._claim_path(name), raw, self.me, durable=False)[1] is not None

    def release_claims(self, names: Sequence[str] | None = None) -> None:
        """Give back claims (all this process holds by default)."""
        for name in list(self._claims) if names is None else names:
            owners.release(self._claim_path(name), self.me)
            self._claims.discard(name)

    def _refuse_live_claims(self, why: str) -> None:
        for path in sorted(self.state_dir.glob(f"*{CLAIM_SUFFIX}")) if self.state_dir.is_dir() else []:
            try:
                owner, dead = owners.judge(path, path.read_bytes(), self.me, durable=False)
            except FileNotFoundError:
                continue  # released meanwhile
            if owner.get("token") != self.me["token"] and dead is None:
                raise UserError(f"{path.name[:-len(CLAIM_SUFFIX)]} is being embedded by another run (pid "
                                f"{owner.get('pid')} on {owner.get('host')}): {why}; wait for it to finish")

    def commit(self, url: str, name: str, *, keys: Sequence[str], indices: Sequence[int],
               labels: Sequence[int | None], embeddings: np.ndarray, extra: dict[str, list[str | None]],
               metadata: EmbeddingMeta, seen: int, skipped: Sequence[tuple[str, str]], seconds: float,
               warnings: Sequence[tuple[str, str]] = ()) -> ShardRecord:
        """Parquet file first (atomic), then the done record: a shard with a record is always complete."""
        table = store.embedding_table(keys, url, indices, labels, embeddings, metadata.dtype, extra, metadata)
        path = self.emb_dir / f"{name}.parquet"
        store.write_table(path, table)
        record = {"url": url, "output": f"{EMBEDDINGS}/{name}.parquet", "seen": seen, "embedded": len(keys),
                  "skipped": [{"key": k, "reason": r} for k, r in skipped],
                  "warnings": [{"key": k, "reason": r} for k, r in warnings], "file": file_check(path),
                  "seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_json(self._done_path(name), record)
        self._failed_path(name).unlink(missing_ok=True)
        return ShardRecord(url, record["output"], seen, len(keys), record["skipped"], seconds)

    def record_failure(self, url: str, name: str, reason: str, crashed: bool = False) -> None:
        """Write ``_state/<name>.failed.json``; on a full disk the failure is still in the summary and exit status.

        ``crashed``: the shard killed the process embedding it; later runs embed it in a child process.
        """
        try:
            atomic.write_json(self._failed_path(name), {"url": url, "reason": reason, "crashed": crashed,
                                                        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as e:
            log.error("cannot record the failure of %s (%s): %s", url, reason, e)

    def mark_success(self) -> None:
        atomic.write_bytes(self.out / SUCCESS, b"")


def positive_count(value: Any) -> int:
    """A count a record holds, 0 where it holds none (or garbage)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
