"""Engine ``local``: every pending shard streamed through one DataLoader in this process, on the run's device."""
from __future__ import annotations

import logging

from ..options import EmbedSummary
from . import Engine, EngineJob

log = logging.getLogger(__name__)


def run(job: EngineJob, summary: EmbedSummary) -> list[str]:
    """Embed ``job.pending`` here, with ``job.model`` (else a model prepared now); returns the shards left
    unfinished because a decode worker process died (the runner hands them to a child process)."""
    if not job.pending:
        return []
    from ..worker import decode_worker_died, default_workers, iter_embedded, outcome, prepare_model

    cfg, names, state, bar = job.cfg, job.names, job.state, job.progress
    bb, ex = job.model or prepare_model(cfg)
    left = dict.fromkeys(job.pending)  # in order
    workers = cfg.workers if cfg.workers is not None else default_workers(ex.device)
    shards = iter_embedded(job.pending, names, state, bb, ex, cfg, workers, bar)
    try:
        for url, rec, reason in shards:
            summary.add(url, **outcome(rec, reason))
            if bar is not None:
                bar.shard_finished(summary)
            state.release_claims([names[url]])
            left.pop(url, None)
    except RuntimeError as e:
        if not decode_worker_died(e):
            raise
        log.error("%s; the %d unfinished shard(s) go to a child process", e, len(left))
    finally:
        shards.close()  # the DataLoader's workers are shut down (and unwatched) before any child starts
    return list(left)


ENGINE = Engine("local", run, "one DataLoader in this process", runs_model_here=True)
