"""Engine ``ray`` (``--engine ray``): the same per-shard unit of work in a Ray Data actor pool, writing the same
layout; Ray places the actors (one per GPU, else a share of the CPUs)."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ...errors import UserError
from ..options import EmbedConfig, EmbedSummary
from . import Engine, EngineJob

log = logging.getLogger(__name__)


class ShardEmbedder:
    """A Ray actor: loads the model once, then embeds and commits whole shards with ``embed_one_shard``."""

    def __init__(self, cfg: EmbedConfig, out: str):
        from dataclasses import replace

        import torch

        from ..run_folder import RunState
        from ..worker import prepare_model

        device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.cfg = replace(cfg, device=device, quiet=True)
        self.bb, self.ex = prepare_model(self.cfg)
        self.state = RunState(out)
        # Ray gives each actor its CPU share; decode in-process unless the actor has cores to spare.
        self.workers = cfg.workers if cfg.workers is not None else 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One outcome per shard, as ``worker.outcome`` gives it (JSON: a column of one type, whatever it holds)."""
        from ..worker import embed_one_shard, outcome

        outcomes = []
        for url, name in zip(batch["url"], batch["name"]):
            rec, reason = embed_one_shard(str(url), str(name), self.state, self.bb, self.ex, self.cfg, self.workers)
            outcomes.append(json.dumps(outcome(rec, reason)))
        return {"url": batch["url"], "outcome": np.array(outcomes, dtype=object)}


def run(job: EngineJob, summary: EmbedSummary) -> list[str]:
    """Embed ``job.pending`` on a Ray cluster (``--address``, else a local instance), one actor per GPU or CPU
    share; decides every shard (returns ``[]``).

    Ray may retry a task; each shard commit is atomic and idempotent, so a retry rewrites the same file.
    """
    if not job.pending:
        return []
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'embedpipe[ray]'") from None
    cfg, bar = job.cfg, job.progress
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        if cfg.ray_address:
            kwargs["address"] = cfg.ray_address
        ray.init(**kwargs)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 1))
        n = gpus if gpus and cfg.device != "cpu" else max(1, int(cpus) // 2)
        per_actor = {"num_gpus": 1} if gpus and cfg.device != "cpu" else {"num_cpus": max(0.5, cpus / n)}
        log.info("ray: %d actors (%s), %d shards", n, per_actor, len(job.pending))
        ds = ray.data.from_items([{"url": u, "name": job.names[u]} for u in job.pending],
                                 override_num_blocks=len(job.pending))
        results = ds.map_batches(ShardEmbedder, fn_constructor_args=(cfg, str(job.state.out)), batch_size=1,
                                 concurrency=n, **per_actor)
        for row in results.iter_rows():
            result = json.loads(row["outcome"])
            summary.add(str(row["url"]), **result)
            if bar is not None:
                bar.update(result.get("embedded", 0))
                bar.shard_finished(summary)
    finally:
        if started:
            ray.shutdown()
    return []


ENGINE = Engine("ray", run, "a Ray Data actor pool, one actor per GPU", places_work_itself=True)
