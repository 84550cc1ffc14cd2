"""Engine ``devices``: one worker process per device, pulling parts of a few shards from one shared queue; dead
workers' shards retried once, each alone. ``--devices`` with several devices chooses it; with one worker it is
also the child that embeds the shards that killed their last run (``engines.contain``)."""
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

from ...errors import UserError
from ...model.device import resolve_device
from ..options import EmbedConfig, EmbedSummary
from . import Engine, EngineJob

log = logging.getLogger(__name__)

RESPAWNS_PER_DEVICE = 3
SHARDS_PER_DECODE_WORKER = 2  # a device worker's part: shards for its decode workers, twice over (fewer restarts)
CPU_PROCESSES, CUDA_PROCESSES = "EMBEDPIPE_CPU_WORKERS", "EMBEDPIPE_CUDA_WORKERS"  # device processes of each kind


def _worker(wid: int, device: str, cfg: EmbedConfig, out: str, tasks: Any, results: Any) -> None:
    """Runs in a child process: build the model on ``device`` once, then embed the shards it is handed (a few at a
    time, through one DataLoader) until told to stop."""
    from pathlib import Path

    import torch

    from ..run_folder import RunState
    from ..worker import default_workers, outcome, prepare_model

    # The CPU workers share the usable CPUs instead of each oversubscribing them (prepare_model sets the threads).
    cpu_workers = int(os.environ.get(CPU_PROCESSES, "1"))
    if device != "cpu" and (dev := resolve_device(device)).type == "cuda" and dev.index is not None:
        # This process's GPU is its current device before anything touches CUDA: no context on GPU 0 for each
        # process, and whatever runs on "the current stream" runs on its own GPU.
        torch.cuda.set_device(dev)
    cfg = replace(cfg, device=device)
    try:
        bb, ex = prepare_model(cfg, share=cpu_workers if device == "cpu" else 1)
    except UserError as e:  # a setting this model cannot run with: the same on every worker, so the run stops
        results.put(("refused", wid, None, str(e)))
        return
    state = RunState(Path(out))
    # Each GPU's decode workers take that GPU's share of the node's cores.
    workers = cfg.workers if cfg.workers is not None else default_workers(ex.device, int(os.environ.get(CUDA_PROCESSES, "1")))
    # How many shards it takes at once: one when it decodes in its own process (a native crash there is its death,
    # which must cost one shard), else a part for its decode workers (their crashes are contained per shard below).
    results.put(("ready", wid, None, SHARDS_PER_DECODE_WORKER * workers or 1))
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the run was killed: do not linger as an orphan
                return
            continue
        if task is None:
            return
        for url, rec, reason in _embed_chunk(task, state, bb, ex, cfg, workers, _Progress(results, wid, None)):
            results.put(("done", wid, url, outcome(rec, reason)))


def _embed_chunk(chunk: list[tuple[str, str]], state: Any, bb: Any, ex: Any, cfg: EmbedConfig, workers: int,
                 progress: Any) -> Any:
    """Each shard of ``chunk`` (url, output name) as committed: through one DataLoader, so each decode worker reads
    whole shards; after a decode worker died (a native crash in a decoder), the shards left one at a time, so
    a shard that kills its decoder again fails alone (recorded as a crash)."""
    from ..worker import decode_worker_died, embed_one_shard, iter_embedded

    names = dict(chunk)
    left = dict(chunk)
    shards = iter_embedded(list(names), names, state, bb, ex, cfg, workers, progress)
    try:
        for url, rec, reason in shards:
            left.pop(url, None)
            yield url, rec, reason
    except RuntimeError as e:
        if not decode_worker_died(e):
            raise
        log.error("%s; the %d unfinished shard(s) of this worker's part are embedded one at a time", e, len(left))
    finally:
        shards.close()
    for url, name in left.items():
        yield url, *embed_one_shard(url, name, state, bb, ex, cfg, workers, progress)


class _Progress:
    """A worker's images embedded, sent to the parent's progress bar (one message per batch)."""

    def __init__(self, results: Any, wid: int, url: str):
        self.results, self.wid, self.url = results, wid, url

    def update(self, n: int) -> None:
        self.results.put(("progress", self.wid, self.url, n))


def run(job: EngineJob, summary: EmbedSummary) -> list[str]:
    """Embed ``job.pending`` with one process per entry of ``job.devices``; decides every shard (returns ``[]``).

    ``job.progress`` counts every worker's images and each finished shard: one bar for all.

    Workers ask for work as they finish, so faster devices take more shards; each takes a part of a few shards
    (two per decode worker: :func:`next_part`) through one DataLoader, so each decode worker reads whole shards. A
    worker that dies is replaced (up to ``job.respawns`` times per device); each shard it held is retried once,
    alone, by another worker, then recorded as failed.
    """
    if not job.pending:
        return []
    os.environ[CPU_PROCESSES] = str(sum(d == "cpu" for d in job.devices))
    os.environ[CUDA_PROCESSES] = str(sum(d != "cpu" for d in job.devices))
    respawns = RESPAWNS_PER_DEVICE if job.respawns is None else job.respawns
    pool = _Pool(job, summary, respawns)
    try:
        for wid in range(len(job.devices)):
            pool.spawn(wid)
        pool.dispatch()
    finally:
        pool.stop()
    return []


def next_part(todo: deque[tuple[str, str]], wants: int, workers: int, alone: set[str]) -> list[tuple[str, str]]:
    """The next part of ``todo`` (taken from its front) for a worker that takes ``wants`` shards at once: no more
    than a fair share of what is left among ``workers``, so the last parts spread over every worker, and a shard
    in ``alone`` (a dead worker held it) in a part of its own.

    Example:
        >>> next_part(deque([("a", "a"), ("b", "b"), ("c", "c")]), 4, 2, set())
        [('a', 'a'), ('b', 'b')]
    """
    size = max(1, min(wants, -(-len(todo) // max(1, workers))))
    part: list[tuple[str, str]] = []
    while todo and len(part) < size:
        if todo[0][0] in alone:
            return part or [todo.popleft()]
        part.append(todo.popleft())
    return part


class _Pool:
    """The device worker processes of one run, their queues, and which shard each one holds."""

    def __init__(self, job: EngineJob, summary: EmbedSummary, respawns: int):
        self.ctx = mp.get_context("spawn")  # CUDA and threads rule out fork
        self.pending, self.names, self.state, self.cfg, self.devices = (job.pending, job.names, job.state, job.cfg,
                                                                        job.devices)
        self.out = str(job.state.out)
        self.summary, self.progress, self.respawns = summary, job.progress, respawns
        self.results = self.ctx.Queue()
        self.todo = deque((u, self.names[u]) for u in self.pending)
        self.attempts: dict[str, int] = {}
        self.procs: dict[int, Any] = {}
        self.inbox: dict[int, Any] = {}
        self.current: dict[int, list[str]] = {}  # the shards each worker holds, in its part
        self.wants: dict[int, int] = {}  # how many shards each worker takes at once
        self.alone: set[str] = set()  # shards a dead worker held: retried one per part, so only a culprit fails
        self.spawned = {d: 0 for d in set(self.devices)}

    def spawn(self, wid: int) -> None:
        self.inbox[wid] = self.ctx.Queue()
        # Not a daemon: a daemonic process may not start the DataLoader's decode workers (the GPU default).
        # stop() ends the workers on every way out of the run; an orphaned worker exits by itself.
        self.procs[wid] = self.ctx.Process(target=_worker, args=(wid, self.devices[wid], self.cfg, str(self.out),
                                                                 self.inbox[wid], self.results))
        self.procs[wid].start()
        self.current[wid] = []

    def give_work(self, wid: int) -> None:
        """Hand ``wid`` its next part: as many shards as it takes at once, but no more than its fair share of those
        left, so that the last parts spread over every worker."""
        if not self.todo:
            return
        part = next_part(self.todo, self.wants.get(wid, 1), sum(p.is_alive() for p in self.procs.values()),
                         self.alone)
        for url, _ in part:
            self.attempts[url] = self.attempts.get(url, 0) + 1
        self.current[wid] = [url for url, _ in part]
        self.inbox[wid].put(part)

    def dispatch(self) -> None:
        """Hand out shards as workers ask, count what they report, replace the dead, until every shard is decided."""
        before = self.summary.finished  # the summary may hold shards embedded elsewhere in this run
        finished = 0
        while finished < len(self.pending):
            try:
                kind, wid, url, info = self.results.get(timeout=1.0)
            except queue.Empty:
                self.reap()
                finished = self.summary.finished - before
                if not any(p.is_alive() for p in self.procs.values()) and finished < len(self.pending):
                    raise UserError(f"every device worker died; {len(self.pending) - finished} shard(s) not embedded "
                                    "(rerun to retry them)")
                continue
            if kind == "progress":
                if self.progress is not None:
                    self.progress.update(info)
            elif kind == "ready":
                self.wants[wid] = int(info or 1)
                self.give_work(wid)
            elif kind == "refused":
                raise UserError(info)
            elif kind == "done":
                if url in self.current[wid]:
                    self.current[wid].remove(url)
                self.summary.add(url, **info)
                finished = self.summary.finished - before
                if self.progress is not None:
                    self.progress.shard_finished(self.summary)
                if not self.current[wid]:
                    self.give_work(wid)

    def reap(self) -> None:
        """Find dead workers: retry their shard once elsewhere (or record it failed) and replace the worker."""
        for wid, p in list(self.procs.items()):
            if p.is_alive() or p.exitcode is None:
                continue
            held = self.current.get(wid) or []
            log.error("worker %d on %s died (exit code %s)%s", wid, self.devices[wid], p.exitcode,
                      f" while embedding {', '.join(held)}" if held else "")
            for url in reversed(held):  # back at the front of the queue, in their order
                if self.attempts.get(url, 0) < 2:
                    self.todo.appendleft((url, self.names[url]))
                    self.alone.add(url)
                else:
                    how = f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                    reason = f"worker process died twice on this shard ({how}; a native crash or out of memory?)"
                    self.state.record_failure(url, self.names[url], reason, crashed=True)
                    self.summary.add(url, failed=reason)
            self.current[wid] = []
            del self.procs[wid]
            if self.spawned[self.devices[wid]] < self.respawns:
                self.spawned[self.devices[wid]] += 1
                self.spawn(wid)
            time.sleep(0.1)

    def stop(self) -> None:
        """Tell live workers to finish, wait for them, and end those that do not."""
        for wid, p in self.procs.items():
            if p.is_alive():
                self.inbox[wid].put(None)
        for p in self.procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


ENGINE = Engine("devices", run, "one process per device", takes_devices=True)
