"""How many CPUs this process may use (affinity, cgroup quota, ``EMBEDPIPE_THREADS``) and OpenMP's defaults.

A container limited to 2 CPUs of a 64-core host sees 64 cores in ``os.cpu_count()`` and in its affinity mask;
only the cgroup quota says 2. Thread pools sized by the machine then run 32 threads per CPU.

OpenMP's threads (torch, oneDNN, MKL, FAISS) spin-wait between parallel regions by default. With another busy
process on the same cores, a thread waiting at a barrier spins through the time slice its straggling partner
needs, and the embed rate collapses to a fraction of one thread's (README, Performance). Passive waiting (a
waiting thread sleeps) avoids that; it must be in the environment before the OpenMP runtime is loaded, which is
why :func:`set_openmp_defaults` runs when ``pipeline`` is first imported, before torch or FAISS.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Mapping

from .errors import UserError

log = logging.getLogger(__name__)

THREADS_ENV = "EMBEDPIPE_THREADS"  # the CPUs embedpipe sizes its threads and workers by, instead of measuring them
DEFAULTS_ENV = "EMBEDPIPE_OPENMP_DEFAULTS"  # "0": leave OpenMP's environment as it is (the benchmark's "before")
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # any of them set: the user chose
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _folders(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and every folder above it up to ``base``: a quota on any of them limits this process."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(folder: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` ("QUOTA PERIOD" in microseconds; "max PERIOD" = no limit)."""
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    try:
        quota, period = fields[0], int(fields[1]) if len(fields) > 1 else 100_000
        return None if quota == "max" or period <= 0 else int(quota) / period
    except ValueError:
        log.debug("unreadable %s: %r", folder / "cpu.max", text)
        return None


def _quota_v1(folder: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 = no limit)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or "-1"), int(period or "100000")
    except ValueError:
        log.debug("unreadable CPU quota in %s: %r / %r", folder, quota, period)
        return None
    return q / p if q > 0 and p > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The CPUs this process's cgroup quota allows (cgroup v2 ``cpu.max`` or v1 CFS quota, the smallest on the way
    up from its own cgroup), rounded up; ``None`` when no quota limits it or none can be read.

    ``proc_cgroup`` (``/proc/self/cgroup``) names this process's cgroup in each hierarchy; ``root`` is where the
    hierarchies are mounted (v2 at ``root`` or, on hybrid systems, ``root/unified``; v1's ``cpu`` controller at
    ``root/cpu`` or ``root/cpu,cpuacct``).
    """
    limits: list[float] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and not controllers:  # v2: one unified hierarchy
            mounts, reader = [root, root / "unified"], _quota_v2
        elif "cpu" in controllers.split(","):
            mounts, reader = [root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"], _quota_v1
        else:
            continue
        for mount in dict.fromkeys(mounts):
            if mount.is_dir():
                limits += [q for q in map(reader, _folders(mount, rel)) if q is not None]
    return max(1, math.ceil(min(limits) - 1e-9)) if limits else None


def _override(environ: Mapping[str, str]) -> int | None:
    raw = environ.get(THREADS_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        n = int(raw.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{THREADS_ENV}={raw!r} is not a positive whole number; set it to the number of CPU threads "
                        f"embedpipe may use (e.g. {THREADS_ENV}=4), or unset it to use the CPUs this process may run "
                        "on (its affinity and cgroup quota)")
    return n


def usable_cpus(environ: Mapping[str, str] = os.environ, root: Path = CGROUP_ROOT,
                proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may use: ``EMBEDPIPE_THREADS`` when set, else the fewer of its affinity mask and its
    cgroup quota (rounded up). Every thread count and worker count of embedpipe starts from this number.

    Example:
        >>> usable_cpus({"EMBEDPIPE_THREADS": "3"})
        3
    """
    n = _override(environ)
    if n is not None:
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return max(1, min(cpus, quota) if quota else cpus)


def model_threads(workers: int = 0, share: int = 1, cap: int | None = None,
                  environ: Mapping[str, str] = os.environ) -> int:
    """Intra-op threads for a model on CPU: this process's share of the usable CPUs (``share`` processes run a
    model on them) less its ``workers`` decode processes, which need CPUs beside it; at most ``cap`` (torch's
    own count: physical cores rather than hyperthreads, or ``OMP_NUM_THREADS``), so that no default rises."""
    own = max(1, usable_cpus(environ) // max(1, share) - max(0, workers))
    return min(own, cap) if cap else own


def set_openmp_defaults(environ: MutableMapping[str, str] = os.environ, root: Path = CGROUP_ROOT,
                        proc_cgroup: Path = PROC_CGROUP) -> None:
    """Before an OpenMP runtime loads: passive waiting unless a wait setting is already there; and, unless set,
    ``OMP_NUM_THREADS`` = the usable CPUs where they are fewer than the affinity mask (a cgroup quota) or
    ``EMBEDPIPE_THREADS`` names them, so that torch, MKL and FAISS follow them here and in every child process
    (elsewhere their own defaults stand: torch's is the physical cores). ``EMBEDPIPE_OPENMP_DEFAULTS=0`` leaves
    the environment alone."""
    if environ.get(DEFAULTS_ENV, "").strip() == "0":
        return
    if not any(k in environ for k in WAIT_SETTINGS):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" in environ:
        return
    try:
        cpus = usable_cpus(environ, root, proc_cgroup)
    except UserError:  # a bad EMBEDPIPE_THREADS: the command that sizes its threads says so, not an import
        return
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if _override(environ) is not None or cpus < mask:
        environ["OMP_NUM_THREADS"] = str(cpus)
