"""Engine: one worker process per device, pulling shards from one shared queue; dead workers' shards retried once."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from dataclasses import replace
from typing import Any

import torch

from ..errors import UserError
from ..model.device import usable_cores
from .options import EmbedConfig, EmbedSummary

log = logging.getLogger(__name__)

RESPAWNS_PER_DEVICE = 3


def parse_devices(spec: str) -> list[str]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,cuda:2`` | ``cpu,cpu`` | ``N`` -> a list of torch device strings.

    Example:
        >>> parse_devices("cpu,cpu")
        ['cpu', 'cpu']
    """
    spec = spec.strip()
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n_cuda)] or ["cpu"]
    if spec == "cuda":
        if not n_cuda:
            raise UserError("--devices cuda: no CUDA device is visible here; use --devices cpu")
        return [f"cuda:{i}" for i in range(n_cuda)]
    if spec.isdigit():
        n = int(spec)
        if n < 1 or n > n_cuda:
            raise UserError(f"--devices {n}: {n_cuda} CUDA device(s) visible; use a number from 1 to {n_cuda} "
                            "or --devices cpu,cpu for CPU workers")
        return [f"cuda:{i}" for i in range(n)]
    out = [d.strip() for d in spec.split(",") if d.strip()]
    for d in out:
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise UserError(f"--devices: {d!r} is not a device; use cpu, cuda, cuda:N, a list of these, N, or auto")
        if d.startswith("cuda:") and int(d[5:]) >= n_cuda:
            raise UserError(f"--devices: {d} does not exist ({n_cuda} CUDA device(s) visible)")
    if not out:
        raise UserError("--devices is empty")
    return out


def _worker(wid: int, device: str, cfg: EmbedConfig, out: str, tasks: Any, results: Any) -> None:
    """Runs in a child process: build the model on ``device`` once, then embed shards until told to stop."""
    from pathlib import Path

    from .run_folder import RunState
    from .worker import default_workers, embed_one_shard, outcome, prepare_model

    cpu_workers = int(os.environ.get("EMBEDPIPE_CPU_WORKERS", "1"))
    if device == "cpu":  # share the cores between the CPU workers instead of oversubscribing them
        torch.set_num_threads(max(1, usable_cores() // max(1, cpu_workers)))
    cfg = replace(cfg, device=device)
    bb, ex = prepare_model(cfg)
    state = RunState(Path(out))
    workers = cfg.workers if cfg.workers is not None else default_workers(ex.device)
    results.put(("ready", wid, None, None))
    while True:
        task = tasks.get()
        if task is None:
            return
        url, name = task
        rec, reason = embed_one_shard(url, name, state, bb, ex, cfg, workers, _Progress(results, wid, url))
        results.put(("done", wid, url, outcome(rec, reason)))


class _Progress:
    """A worker's images embedded, sent to the parent's progress bar (one message per batch)."""

    def __init__(self, results: Any, wid: int, url: str):
        self.results, self.wid, self.url = results, wid, url

    def update(self, n: int) -> None:
        self.results.put(("progress", self.wid, self.url, n))


def run_on_devices(pending: list[str], names: dict[str, str], out: str, cfg: EmbedConfig, devices: list[str],
                   summary: EmbedSummary, progress: Any = None, respawns: int = RESPAWNS_PER_DEVICE) -> None:
    """Embed ``pending`` shards with one process per device; fills ``summary`` like the single-process path.

    ``progress`` (an EmbedProgress) counts every worker's images and each finished shard: one bar for all.

    Workers ask for work as they finish, so faster devices take more shards. A worker that dies is
    replaced (up to ``respawns`` times per device); the shard it held is retried once by another worker, then
    recorded as failed.
    """
    from .run_folder import RunState

    ctx = mp.get_context("spawn")  # CUDA and threads rule out fork
    results = ctx.Queue()
    todo = deque((u, names[u]) for u in pending)
    attempts: dict[str, int] = {}
    procs: dict[int, Any] = {}
    inbox: dict[int, Any] = {}
    current: dict[int, str | None] = {}
    spawned = {d: 0 for d in set(devices)}
    os.environ["EMBEDPIPE_CPU_WORKERS"] = str(sum(d == "cpu" for d in devices))
    state = RunState(out)

    def spawn(wid: int) -> None:
        inbox[wid] = ctx.Queue()
        procs[wid] = ctx.Process(target=_worker, args=(wid, devices[wid], cfg, str(out), inbox[wid], results),
                                 daemon=True)
        procs[wid].start()
        current[wid] = None

    def give_work(wid: int) -> None:
        if todo:
            url, name = todo.popleft()
            attempts[url] = attempts.get(url, 0) + 1
            current[wid] = url
            inbox[wid].put((url, name))

    for wid in range(len(devices)):
        spawn(wid)
    before = summary.finished  # the summary may hold shards embedded elsewhere in this run
    finished = 0
    while finished < len(pending):
        try:
            kind, wid, url, info = results.get(timeout=1.0)
        except queue.Empty:
            _reap(procs, current, devices, spawned, respawns, todo, attempts, state, names, summary, spawn)
            finished = summary.finished - before
            if not any(p.is_alive() for p in procs.values()) and finished < len(pending):
                raise UserError(f"every device worker died; {len(pending) - finished} shard(s) not embedded "
                                "(rerun to retry them)")
            continue
        if kind == "progress":
            if progress is not None:
                progress.update(info)
        elif kind == "ready":
            give_work(wid)
        elif kind == "done":
            current[wid] = None
            summary.add(url, **info)
            finished = summary.finished - before
            if progress is not None:
                progress.shard_finished(summary)
            give_work(wid)
    for wid, p in procs.items():
        if p.is_alive():
            inbox[wid].put(None)
    for p in procs.values():
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()


def _reap(procs, current, devices, spawned, respawns, todo, attempts, state, names, summary, spawn) -> None:
    """Find dead workers: retry their shard once elsewhere (or record it failed) and replace the worker."""
    for wid, p in list(procs.items()):
        if p.is_alive() or p.exitcode is None:
            continue
        url = current.get(wid)
        log.error("worker %d on %s died (exit code %s)%s", wid, devices[wid], p.exitcode,
                  f" while embedding {url}" if url else "")
        if url is not None:
            if attempts.get(url, 0) < 2:
                todo.appendleft((url, names[url]))
            else:
                how = f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                reason = f"worker process died twice on this shard ({how}; a native crash or out of memory?)"
                state.record_failure(url, names[url], reason, crashed=True)
                summary.add(url, failed=reason)
        del procs[wid]
        if spawned[devices[wid]] < respawns:
            spawned[devices[wid]] += 1
            spawn(wid)
        time.sleep(0.1)
