"""Owner files: who holds a run folder (``_lock``) or a shard (``_state/<name>.claim``), made so they cannot lie.

An owner file is created whole or not at all: written (and, for the lock, fsynced) under a temporary name,
then hard-linked to its name, which fails if the name exists (so a full disk leaves no empty lock behind). A dead owner's file
is taken over by a compare-and-swap: under an ``flock`` held for a few system calls, the file is replaced only
if it still holds exactly the bytes judged dead, so of several contenders exactly one wins and the others see
the winner alive. A process is dead when, on this host, its pid is gone or now names another process (pid
reuse: its start time differs; containers restart as pid 1), or the machine has rebooted since; or when the
file names this very scheduler task (an earlier attempt, e.g. a requeued Slurm array task on another node).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .. import atomic
from ..errors import UserError

log = logging.getLogger(__name__)

MUTEX = ".owners.lock"  # flock'ed while a dead owner's file is replaced (one per folder of owner files)
_TOKEN = uuid.uuid4().hex  # this process's files, told apart from those of an earlier process with its pid


def _read_first(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc); None where /proc cannot say."""
    stat = _read_first(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else None


def identity() -> dict[str, Any]:
    """This process as an owner file records it."""
    from .cluster import task_identity

    return {"pid": os.getpid(), "host": socket.gethostname(), "boot": _read_first("/proc/sys/kernel/random/boot_id"),
            "start": _start_time(os.getpid()), "since": time.time(), "task": task_identity(),
            "token": _TOKEN}


def gone(owner: dict[str, Any], me: dict[str, Any]) -> str | None:
    """Why ``owner`` is certainly not running any more, or None (alive, or on another host: assume alive)."""
    pid = owner.get("pid")
    same_host = owner.get("host") == me["host"]
    if same_host and isinstance(pid, int):
        if owner.get("boot") and me.get("boot") and owner["boot"] != me["boot"]:
            return f"pid {pid} ran before this machine rebooted"
        if pid == me["pid"] and owner.get("token"):  # not held now: this process acquires a file once at a time
            return (f"pid {pid} is this process, which left it in an earlier call" if owner.get("token") == me["token"]
                    else f"pid {pid} is this process now (an earlier process had the same pid)")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} is dead"
        except PermissionError:
            pass  # alive, another user's
        if owner.get("start") and _start_time(pid) not in (None, owner["start"]):
            return f"pid {pid} is dead (the pid now names another process)"
    if me.get("task") and owner.get("task") == me["task"] and not (same_host and isinstance(pid, int)):
        # The scheduler runs one attempt of a task at a time: this file is a killed earlier attempt's.
        return f"an earlier attempt of task {me['task']} (pid {pid} on {owner.get('host')})"
    return None


def parse(path: Path, raw: bytes) -> dict[str, Any]:
    """An owner file's record; an empty or garbled one is a clear error saying how to clear it."""
    try:
        owner = json.loads(raw)
    except ValueError:
        owner = None
    if not isinstance(owner, dict):
        what = "empty" if not raw.strip() else "not an owner record"
        raise UserError(f"{path} is unreadable ({what}: left by an older embedpipe stopped while creating it, e.g. on "
                        f"a full disk, or edited by hand); if no embedpipe run is using {path.parent}, delete it: "
                        f"rm {path}")
    return owner


def _write_temp(path: Path, me: dict[str, Any], durable: bool) -> str:
    tmp = atomic.temp_beside(path)
    try:
        with open(tmp, "w") as f:
            json.dump(me, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _create(path: Path, me: dict[str, Any], durable: bool) -> bool:
    """Create ``path`` holding ``me`` (complete or absent); False when it exists."""
    tmp = _write_temp(path, me, durable)
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists: the file never appears half-written
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:  # the holder, cleaning up after a killed run, removed our temporary file
        if not path.parent.is_dir():
            raise
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _mutex(folder: Path) -> Iterator[None]:
    with open(folder / MUTEX, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: the scheduler's one-attempt-at-a-time must do
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: no flock on this filesystem (%s); taking over a dead owner without it", folder, e)
        yield


def _replace_if_same(path: Path, raw: bytes, me: dict[str, Any], durable: bool) -> bool:
    """Compare-and-swap: put ``me`` in ``path`` if it still holds exactly ``raw``."""
    with _mutex(path.parent):
        try:
            if path.read_bytes() != raw:
                return False  # another contender took it over first
        except FileNotFoundError:
            return False
        tmp = _write_temp(path, me, durable)
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True


def judge(path: Path, raw: bytes, me: dict[str, Any], durable: bool = True) -> tuple[dict[str, Any], str | None]:
    """The owner recorded in ``raw`` (the bytes of ``path``) and why it is dead (None: alive, or cannot tell).

    A durable file (the lock) that is unreadable is an error saying how to clear it. A claim is not fsynced,
    so one found unreadable was left by a machine that crashed before writing it out: its owner is dead.
    """
    try:
        owner = parse(path, raw)
    except UserError:
        if durable:
            raise
        return {}, "its file is unreadable (its machine stopped before writing it out)"
    return owner, gone(owner, me)


def acquire(path: Path, me: dict[str, Any], durable: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Make ``path`` hold ``me``: ``(live_owner, None)`` when another live process holds it (nothing changed),
    else ``(None, dead_owner)``: ours now, taken over from ``dead_owner`` (None when it was free), whose
    ``"gone"`` says why it was judged dead. ``durable``: fsync the file (the lock; not each shard's claim)."""
    owner: dict[str, Any] = {}
    for _ in range(5):
        if _create(path, me, durable):
            return None, None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # released meanwhile: try again
        owner, why = judge(path, raw, me, durable)
        if why is None:
            return owner, None
        if _replace_if_same(path, raw, me, durable):
            return None, {**owner, "gone": why}
    return owner, None  # changing hands all the time: call it held


def release(path: Path, me: dict[str, Any]) -> None:
    """Remove ``path`` if it is still ours (a file another process took over stays)."""
    try:
        if json.loads(path.read_bytes()).get("token") != me["token"]:
            return
    except (OSError, ValueError, AttributeError):
        return
    path.unlink(missing_ok=True)
