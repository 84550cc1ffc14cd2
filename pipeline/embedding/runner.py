"""The embed runner: plan (expand, partition), claim the output folder, dispatch pending shards to an engine."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..model.device import resolve_device, resolve_precision
from ..version import __version__
from .engines import Engine, EngineJob, contain, engine_for
from .options import EMBEDDING_OPTIONS, EmbedConfig, EmbedSummary
from .progress import EmbedProgress
from . import owners
from .run_folder import CLAIM_SUFFIX, RunState
from .shards import expand, output_names, partition

log = logging.getLogger(__name__)


def embed(shards: Sequence[str] | str, out: str | Path, **options: Any) -> EmbedSummary:
    """Embed WebDataset shards into ``out/embeddings/<shard>.parquet``, one file per shard, resumably.

    Args:
        shards: shard specs (paths, globs, ``{000..099}`` ranges, ``@list.txt``, urls).
        out: output folder; rerunning into it skips shards that are done and retries failed ones.
        **options: any field of :class:`EmbedConfig` (model, weights, compile, precision, batch_size, ...).

    Example:
        >>> summary = embed("data/shard-{000000..000009}.tar", "out", model="default")  # doctest: +SKIP
        >>> summary.failed  # doctest: +SKIP
        {}
    """
    t0 = time.time()
    cfg = EmbedConfig(**options)
    cfg.validate()
    if cfg.preprocess is not None:  # the values, not a file's name: run.json and every worker process see them
        cfg = replace(cfg, preprocess=json.dumps(cfg.preprocess_changes(), sort_keys=True))
    devices = cfg.device_list()
    engine = engine_for(cfg.engine, devices)
    all_urls = expand([shards] if isinstance(shards, str) else shards)
    if not all_urls:
        raise UserError("no shards given; pass paths, globs, brace ranges or @list.txt")
    rank, world = cfg.rank_world()
    urls = partition(all_urls, rank, world) if world > 1 else all_urls
    if world > 1:
        from .cluster import describe_source

        log.info("rank %d of %d (%s): %d of %d shards", rank, world, describe_source(cfg.rank, cfg.world_size),
                 len(urls), len(all_urls))
    if devices and len(devices) == 1:
        cfg, devices = replace(cfg, device=devices[0], devices=None), None
    devices = devices or [cfg.device]
    state = RunState(Path(out), rank, world)
    # From the full list and the folder's records: every rank, and every later run, names every shard alike.
    names = output_names(all_urls, state.recorded_urls())
    if not cfg.overwrite and state.same_options(asdict(cfg), EMBEDDING_OPTIONS) and all(
            state.is_done(u, names[u]) for u in urls):
        return _nothing_to_do(all_urls, urls, names, state, t0)
    state.acquire()  # before the model loads: a second run on the folder is refused at once
    previous = _exit_on_sigterm()
    surprise = True
    try:
        # torch and the model only once there is something to embed (a no-op rerun stays well under a second)
        from .worker import fingerprint, load_configured_backbone, prepare_model

        pending = [u for u in urls if not state.is_done(u, names[u])]
        # The model runs in other processes (devices, Ray, or a child for shards that killed their last run): here
        # only the fingerprint is needed, so the backbone is loaded without building, compiling or measuring it.
        elsewhere = not engine.runs_model_here or bool(pending) and all(state.died_on(u, names[u]) for u in pending)
        log.info("loading %s (weights %s)%s", cfg.model, cfg.weights, "" if elsewhere else f" for device {cfg.device}")
        bb = load_configured_backbone(cfg)
        # run_cfg: cfg with --precision auto resolved once, here, for every engine and process of the run; run.json
        # keeps the options as given (auto), so that a rerun with nothing to do still loads no model.
        run_cfg, choice = _auto_precision(cfg, bb, state, pending or urls, devices)
        if elsewhere:
            model = None
            precision = resolve_precision(run_cfg.precision, resolve_device(devices[0]))
        else:
            from .run_images import expected_images

            model = prepare_model(run_cfg, bb=bb, count_images=lambda: expected_images(pending or urls))
            precision = model[1].precision
        state.check_run(fingerprint(bb, precision, run_cfg),
                        {**asdict(cfg), "shards": len(all_urls), "version": __version__},
                        cfg.overwrite, names=list(names.values()), precision_choice=choice)
        summary = _run(all_urls, urls, EngineJob([], names, state, run_cfg, devices, model=model), engine)
        summary.setup_seconds = summary.started - t0
        surprise = False
        return summary
    except (SystemExit, KeyboardInterrupt, UserError):
        surprise = False
        raise
    finally:
        # A run ended by an unexpected error keeps the claims of its unfinished shards (as a killed run does):
        # their owner is then gone, so the next run embeds them in a child process, in case one caused it.
        state.release(claims=not surprise)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _auto_precision(cfg: EmbedConfig, bb: Any, state: RunState, urls: list[str],
                    devices: list[str]) -> tuple[EmbedConfig, dict[str, Any] | None]:
    """``cfg`` with ``--precision auto`` resolved where the model runs on CPUs, and the record of the choice for
    run.json: a folder that holds embeddings keeps the precision they were made in (a rerun or resume never turns
    into a settings conflict); a new one gets ``model/auto_precision.py``'s measured choice on the run's images."""
    if cfg.precision != "auto" or any(resolve_device(d).type != "cpu" for d in devices):
        return cfg, None
    from ..model import auto_precision
    from .run_images import run_images

    kept = None if cfg.overwrite else state.recorded_precision()
    if kept in auto_precision.CPU_CHOICES:
        log.info("--precision auto: %s, the precision the embeddings in %s were made in", kept, state.out)
        earlier = state.recorded_precision_choice()
        return replace(cfg, precision=kept), earlier or {"precision": kept, "cosine": None,
                                                         "why": "the precision the folder's embeddings were made in"}
    choice = auto_precision.choose(bb, lambda: run_images(urls, bb.preprocess, auto_precision.PROBE_IMAGES),
                                   cfg.cache_dir)
    refused = choice.precision == "fp32" and choice.cosine is not None
    (log.warning if refused else log.info)("--precision auto: %s (%s)", choice.precision, choice.why)
    return replace(cfg, precision=choice.precision), choice.to_dict()


def _nothing_to_do(all_urls: list[str], urls: list[str], names: dict[str, str], state: RunState,
                   t0: float) -> EmbedSummary:
    """Every shard of this run is done with these options: no model is loaded (cron ticks, reruns)."""
    log.info("every shard is already done (%d); nothing to embed, no model loaded", len(urls))
    summary = EmbedSummary(state.out, shards_total=len(urls), shards_skipped=len(urls))
    state.acquire()  # another run writing here still gets its "in use" error
    try:
        _clear_dead_claims(state, [names[u] for u in urls])
        if all(state.is_done(u, names[u]) for u in all_urls):
            state.mark_success()
    finally:
        state.release()
    summary.setup_seconds = time.time() - t0
    return summary


def _clear_dead_claims(state: RunState, done: Sequence[str]) -> None:
    """Remove the claims that dead runs left on done shards (killed between the done record and the claim's
    removal); a live run's claim stays."""
    for name in done:
        path = state.state_dir / f"{name}{CLAIM_SUFFIX}"
        if path.exists() and owners.acquire(path, state.me, durable=False)[0] is None:
            owners.release(path, state.me)


def _exit_on_sigterm() -> Any:
    """Schedulers stop jobs with SIGTERM: turn it into SystemExit so the lock is released on the way out."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _run(all_urls: list[str], urls: list[str], job: EngineJob, engine: Engine) -> EmbedSummary:
    """Claim the pending shards of ``urls`` and hand them to ``engine`` (``job``: where, with what, no shards yet)."""
    names, state, cfg = job.names, job.state, job.cfg
    summary = EmbedSummary(state.out, shards_total=len(urls))
    pending = [u for u in urls if not state.is_done(u, names[u])]
    died = {u for u in pending if state.died_on(u, names[u])}  # before claiming: then the claims are ours
    ours, held, taken = state.claim_shards({u: names[u] for u in pending})
    died |= set(taken)
    pending = [u for u in ours if not state.is_done(u, names[u])]  # the run that held it may have finished it
    state.release_claims([names[u] for u in ours if u not in pending])
    _clear_dead_claims(state, [names[u] for u in urls if u not in ours and u not in held])
    if held:
        url, owner = next(iter(held.items()))
        log.warning("%d shard(s) are being embedded by another run (e.g. %s by pid %s on %s); this run leaves them "
                    "to it", len(held), url, owner.get("pid"), owner.get("host"))
    state.remove_stale_temps([names[u] for u in ours])
    summary.shards_elsewhere = len(held)
    summary.shards_skipped = len(urls) - len(pending) - len(held)
    summary.started = time.time()
    if pending:
        with EmbedProgress(pending, quiet=cfg.quiet) as bar:
            # The model of an engine that runs it in this process gets no shard that killed a process (nor any
            # when it was not prepared): those, and the shards it leaves, go to a child process.
            if not engine.runs_model_here:
                here = pending
            else:
                here = [u for u in pending if u not in died] if job.model is not None else []
            left = set(engine.run(replace(job, pending=here, progress=bar), summary)) if here else set()
            left |= set(pending) - set(here)
            contain(replace(job, pending=[u for u in pending if u in left], progress=bar, model=None), summary)
    summary.seconds = time.time() - summary.started
    # The last rank to finish sees every shard of the full list done and marks the folder complete.
    if not summary.failed and all(state.is_done(u, names[u]) for u in all_urls):
        state.mark_success()
    return summary
