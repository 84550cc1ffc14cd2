"""Engine ``--engine ray``: the same per-shard unit of work in a Ray Data actor pool, writing the same layout."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import UserError
from .options import EmbedConfig, EmbedSummary

log = logging.getLogger(__name__)


class ShardEmbedder:
    """A Ray actor: loads the model once, then embeds and commits whole shards with ``embed_one_shard``."""

    def __init__(self, cfg: EmbedConfig, out: str):
        import torch

        from .run_folder import RunState
        from .worker import prepare_model

        device = "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        from dataclasses import replace

        self.cfg = replace(cfg, device=device, quiet=True)
        self.bb, self.ex = prepare_model(self.cfg)
        self.state = RunState(out)
        # Ray gives each actor its CPU share; decode in-process unless the actor has cores to spare.
        self.workers = cfg.workers if cfg.workers is not None else 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .worker import embed_one_shard

        embedded, skipped, failed = [], [], []
        for url, name in zip(batch["url"], batch["name"]):
            rec, reason = embed_one_shard(str(url), str(name), self.state, self.bb, self.ex, self.cfg, self.workers)
            embedded.append(rec.embedded if rec else 0)
            skipped.append(len(rec.skipped) if rec else 0)
            failed.append(reason or "")
        return {"url": batch["url"], "embedded": np.array(embedded), "skipped": np.array(skipped),
                "failed": np.array(failed, dtype=object)}


def run_with_ray(pending: list[str], names: dict[str, str], out: str, cfg: EmbedConfig, summary: EmbedSummary,
                 address: str | None = None, actors: int | None = None) -> None:
    """Embed ``pending`` shards on a Ray cluster (or a local instance), one actor per GPU or CPU share.

    Ray may retry a task; each shard commit is atomic and idempotent, so a retry rewrites the same file.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'embedpipe[ray]'") from None
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
        if address:
            kwargs["address"] = address
        ray.init(**kwargs)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 1))
        n = actors or (gpus if gpus and cfg.device != "cpu" else max(1, int(cpus) // 2))
        per_actor = {"num_gpus": 1} if gpus and cfg.device != "cpu" else {"num_cpus": max(0.5, cpus / n)}
        log.info("ray: %d actors (%s), %d shards", n, per_actor, len(pending))
        ds = ray.data.from_items([{"url": u, "name": names[u]} for u in pending], override_num_blocks=len(pending))
        results = ds.map_batches(ShardEmbedder, fn_constructor_args=(cfg, str(out)), batch_size=1, concurrency=n,
                                 **per_actor)
        for row in results.iter_rows():
            summary.add(str(row["url"]), int(row["embedded"]), int(row["skipped"]), str(row["failed"]) or None)
    finally:
        if started:
            ray.shutdown()
