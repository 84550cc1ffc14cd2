"""Engine ``devices``: one worker process per device, pulling shards from one shared queue; dead workers' shards
retried once. ``--devices`` with several devices chooses it; with one worker it is also the child that embeds the
shards that killed their last run (``engines.contain``)."""
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
from ..options import EmbedConfig, EmbedSummary
from . import Engine, EngineJob

log = logging.getLogger(__name__)

RESPAWNS_PER_DEVICE = 3


def _worker(wid: int, device: str, cfg: EmbedConfig, out: str, tasks: Any, results: Any) -> None:
    """Runs in a child process: build the model on ``device`` once, then embed shards until told to stop."""
    from pathlib import Path

    from ..run_folder import RunState
    from ..worker import default_workers, embed_one_shard, outcome, prepare_model

    # The CPU workers share the usable CPUs instead of each oversubscribing them (prepare_model sets the threads).
    cpu_workers = int(os.environ.get("EMBEDPIPE_CPU_WORKERS", "1"))
    cfg = replace(cfg, device=device)
    try:
        bb, ex = prepare_model(cfg, share=cpu_workers if device == "cpu" else 1)
    except UserError as e:  # a setting this model cannot run with: the same on every worker, so the run stops
        results.put(("refused", wid, None, str(e)))
        return
    state = RunState(Path(out))
    workers = cfg.workers if cfg.workers is not None else default_workers(ex.device)
    results.put(("ready", wid, None, None))
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
        url, name = task
        rec, reason = embed_one_shard(url, name, state, bb, ex, cfg, workers, _Progress(results, wid, url))
        results.put(("done", wid, url, outcome(rec, reason)))


class _Progress:
    """A worker's images embedded, sent to the parent's progress bar (one message per batch)."""

    def __init__(self, results: Any, wid: int, url: str):
        self.results, self.wid, self.url = results, wid, url

    def update(self, n: int) -> None:
        self.results.put(("progress", self.wid, self.url, n))


def run(job: EngineJob, summary: EmbedSummary) -> list[str]:
    """Embed ``job.pending`` with one process per entry of ``job.devices``; decides every shard (returns ``[]``).

    ``job.progress`` counts every worker's images and each finished shard: one bar for all.

    Workers ask for work as they finish, so faster devices take more shards. A worker that dies is
    replaced (up to ``job.respawns`` times per device); the shard it held is retried once by another worker, then
    recorded as failed.
    """
    if not job.pending:
        return []
    os.environ["EMBEDPIPE_CPU_WORKERS"] = str(sum(d == "cpu" for d in job.devices))
    respawns = RESPAWNS_PER_DEVICE if job.respawns is None else job.respawns
    pool = _Pool(job, summary, respawns)
    try:
        for wid in range(len(job.devices)):
            pool.spawn(wid)
        pool.dispatch()
    finally:
        pool.stop()
    return []


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
        self.current: dict[int, str | None] = {}
        self.spawned = {d: 0 for d in set(self.devices)}

    def spawn(self, wid: int) -> None:
        self.inbox[wid] = self.ctx.Queue()
        # Not a daemon: a daemonic process may not start the DataLoader's decode workers (the GPU default).
        # stop() ends the workers on every way out of the run; an orphaned worker exits by itself.
        self.procs[wid] = self.ctx.Process(target=_worker, args=(wid, self.devices[wid], self.cfg, str(self.out),
                                                                 self.inbox[wid], self.results))
        self.procs[wid].start()
        self.current[wid] = None

    def give_work(self, wid: int) -> None:
        if self.todo:
            url, name = self.todo.popleft()
            self.attempts[url] = self.attempts.get(url, 0) + 1
            self.current[wid] = url
            self.inbox[wid].put((url, name))

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
                self.give_work(wid)
            elif kind == "refused":
                raise UserError(info)
            elif kind == "done":
                self.current[wid] = None
                self.summary.add(url, **info)
                finished = self.summary.finished - before
                if self.progress is not None:
                    self.progress.shard_finished(self.summary)
                self.give_work(wid)

    def reap(self) -> None:
        """Find dead workers: retry their shard once elsewhere (or record it failed) and replace the worker."""
        for wid, p in list(self.procs.items()):
            if p.is_alive() or p.exitcode is None:
                continue
            url = self.current.get(wid)
            log.error("worker %d on %s died (exit code %s)%s", wid, self.devices[wid], p.exitcode,
                      f" while embedding {url}" if url else "")
            if url is not None:
                if self.attempts.get(url, 0) < 2:
                    self.todo.appendleft((url, self.names[url]))
                else:
                    how = f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                    reason = f"worker process died twice on this shard ({how}; a native crash or out of memory?)"
                    self.state.record_failure(url, self.names[url], reason, crashed=True)
                    self.summary.add(url, failed=reason)
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
