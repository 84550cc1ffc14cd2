"""The embed runner: shards -> DataLoader -> frozen backbone -> one Parquet file per shard, resumable."""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import __version__, store
from .backbones import DEFAULT_MODEL, Backbone, load_backbone, with_input_size
from .compiler import Extractor, build_extractor, resolve_device, resolve_precision
from .devices import parse_devices, usable_cores
from .errors import UserError
from .reader import DEFAULT_MAX_PIXELS, KEEPABLE, Piece, ShardSamples
from .shards import expand, output_names, partition
from .state import RunState, ShardRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """Every option of the embed stage; validated before any data or device is touched."""

    model: str = DEFAULT_MODEL
    weights: str = "default"
    layer: str | None = None
    input_size: int | None = None
    compile: str = "torchscript"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    micro_batch: int | None = None
    workers: int | None = None
    out_dtype: str = "float16"
    normalize: bool = True
    keep: tuple[str, ...] = KEEPABLE
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_dir: str | None = None
    overwrite: bool = False
    quiet: bool = False
    devices: str | None = None
    engine: str = "local"
    ray_address: str | None = None
    rank: int | None = None
    world_size: int | None = None

    def rank_world(self) -> tuple[int, int]:
        """This process's share of the shards: explicit values, else the cluster's environment variables."""
        from .cluster import resolve_rank_world

        rank, world = resolve_rank_world(self.rank, self.world_size)
        if world > 1 and self.overwrite:
            raise UserError("--overwrite cannot be combined with several ranks (each would delete the others' "
                            "output); run once with --overwrite and no rank, or delete the folder first")
        return rank, world

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise UserError(f"--micro-batch must be 0 (whole batch) or more, got {self.micro_batch}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        if self.out_dtype not in ("float16", "float32"):
            raise UserError(f"--out-dtype must be float16 or float32, got {self.out_dtype!r}")
        bad = [k for k in self.keep if k not in KEEPABLE]
        if bad:
            raise UserError(f"--keep accepts {', '.join(KEEPABLE)}; got {', '.join(bad)}")
        if self.input_size is not None and not 16 <= self.input_size <= 2048:
            raise UserError(f"--input-size must be between 16 and 2048 pixels, got {self.input_size}")
        if self.engine not in ("local", "ray"):
            raise UserError(f"--engine must be local or ray, got {self.engine!r}")
        if self.engine == "ray" and self.devices:
            raise UserError("--engine ray places work itself (one actor per GPU); drop --devices")
        if self.max_pixels < 1:
            raise UserError("--max-pixels must be positive")


@dataclass
class Summary:
    """What one run did; ``failed`` maps shard url -> reason."""

    out: Path
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    embedded: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def add(self, url: str, rec: ShardRecord | None, reason: str | None) -> None:
        if rec is None:
            self.failed[url] = reason or "unknown"
        else:
            self.shards_done += 1
            self.embedded += rec.embedded
            self.skipped += len(rec.skipped)

    def line(self) -> str:
        return (f"embedded {self.embedded} samples ({self.skipped} skipped) from "
                f"{self.shards_done + self.shards_skipped}/{self.shards_total} shards "
                f"({self.shards_skipped} already done, {len(self.failed)} failed) in {self.seconds:.1f}s, "
                f"{self.images_per_s:.1f} img/s -> {self.out}")


def default_workers(device: torch.device) -> int:
    """Decode workers: most cores feed a GPU. On CPU the model needs the cores, and decoding in-process
    (no worker) avoids oversubscribing small machines: measured E 0.97 vs 0.83 with one worker on 2 cores."""
    cores = usable_cores()
    return min(cores, 16) if device.type == "cuda" else cores // 4


def fingerprint(bb: Backbone, ex: Extractor, cfg: EmbedConfig) -> dict[str, Any]:
    """What makes two runs' embeddings interchangeable; a folder holds one fingerprint only."""
    return {"model": bb.spec, "weights_sha256": bb.weights_sha256, "layer": bb.layer,
            "preprocess": bb.preprocess.to_dict(), "precision": ex.precision, "dtype": cfg.out_dtype,
            "normalize": cfg.normalize, "keep": sorted(cfg.keep)}


def shard_metadata(bb: Backbone, ex: Extractor, cfg: EmbedConfig) -> dict[str, Any]:
    return {"model": bb.spec, "weights": bb.weights, "weights_sha256": bb.weights_sha256, "layer": bb.layer,
            "dim": bb.num_features, "dtype": cfg.out_dtype, "precision": ex.precision, "compile": ex.compile,
            "preprocess": bb.preprocess.to_dict(), "normalize": cfg.normalize, "version": __version__}


class _Crash:
    """Test hook: EMBEDPIPE_CRASH_AT=N kills this process (SIGKILL, like kill -9) once N samples are embedded.

    With EMBEDPIPE_CRASH_ONCE=FILE only the first process to create FILE crashes (for retry tests).
    """

    def __init__(self) -> None:
        self.at = int(os.environ.get("EMBEDPIPE_CRASH_AT", "0") or 0)
        self.once = os.environ.get("EMBEDPIPE_CRASH_ONCE")
        self.count = 0

    def tick(self, n: int) -> None:
        self.count += n
        if self.at and self.count >= self.at:
            if self.once:
                try:
                    os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    self.at = 0
                    return
            os.kill(os.getpid(), signal.SIGKILL)


class _ShardBuffer:
    """Rows of one shard collected from every worker until all of them report its end."""

    def __init__(self) -> None:
        self.pieces: list[tuple[Piece, np.ndarray]] = []
        self.ends = 0
        self.seen = 0
        self.skipped: list[tuple[str, str]] = []
        self.failed: str | None = None
        self.started = time.time()

    def add(self, piece: Piece, emb: np.ndarray | None) -> None:
        if emb is not None and len(piece.keys):
            self.pieces.append((piece, emb))
        self.skipped.extend(piece.skipped)
        self.seen += piece.seen
        if piece.failed and self.failed is None:
            self.failed = piece.failed
        self.ends += int(piece.end)


def _embed_batch(ex: Extractor, images: torch.Tensor, normalize: bool, dtype: str) -> np.ndarray:
    feats = ex(images)
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats.cpu().numpy().astype(dtype, copy=False)


def embed(shards: Sequence[str] | str, out: str | Path, **options: Any) -> Summary:
    """Embed WebDataset shards into ``out/embeddings/<shard>.parquet``, one file per shard, resumably.

    Args:
        shards: shard specs (paths, globs, ``{000..099}`` ranges, ``@list.txt``, urls).
        out: output folder; rerunning into it skips shards that are done and retries failed ones.
        **options: any field of :class:`EmbedConfig` (model, weights, compile, precision, batch_size, ...).

    Example:
        >>> summary = embed("data/shard-{000000..000009}.tar", "out", model="default")
        >>> summary.failed
        {}
    """
    cfg = EmbedConfig(**options)
    cfg.validate()
    all_urls = expand([shards] if isinstance(shards, str) else shards)
    if not all_urls:
        raise UserError("no shards given; pass paths, globs, brace ranges or @list.txt")
    rank, world = cfg.rank_world()
    urls = partition(all_urls, rank, world) if world > 1 else all_urls
    if world > 1:
        from .cluster import describe_source

        log.info("rank %d of %d (%s): %d of %d shards", rank, world, describe_source(cfg.rank, cfg.world_size),
                 len(urls), len(all_urls))
    devices = parse_devices(cfg.devices) if cfg.devices else None
    if devices and len(devices) == 1:
        cfg, devices = replace(cfg, device=devices[0], devices=None), None
    elsewhere = devices or cfg.engine == "ray"  # the model runs in other processes; here only the fingerprint
    main_cfg = replace(cfg, device="cpu", compile="eager", precision="fp32") if elsewhere else cfg
    bb, ex = prepare_model(main_cfg)  # with several devices: only for the fingerprint, on CPU
    if elsewhere:
        ex.precision = resolve_precision(cfg.precision, resolve_device(devices[0] if devices else cfg.device))
    state = RunState(Path(out), lock_name="_lock" if world == 1 else f"_lock.{rank}-of-{world}")
    fp = fingerprint(bb, ex, cfg)
    state.claim(fp, {**asdict(cfg), "shards": len(all_urls), "version": __version__}, cfg.overwrite)
    previous = _exit_on_sigterm()
    try:
        return _run(all_urls, urls, state, bb, ex, cfg, devices)
    finally:
        state.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm() -> Any:
    """Schedulers stop jobs with SIGTERM: turn it into SystemExit so the lock is released on the way out."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def prepare_model(cfg: EmbedConfig) -> tuple[Backbone, Extractor]:
    """The frozen backbone and its compiled extractor for ``cfg`` (the same in every engine and process)."""
    bb = load_backbone(cfg.model, cfg.weights, cfg.layer)
    if cfg.input_size:
        bb = with_input_size(bb, cfg.input_size)
    ex = build_extractor(bb, cfg.device, cfg.precision, cfg.compile, cfg.cache_dir, micro_batch=cfg.micro_batch)
    if cfg.compile == "inductor":  # compile now, at the batch size of the run, not inside the timed loop
        size = bb.preprocess.input_size
        ex(torch.zeros(cfg.batch_size, 3, size, size, dtype=torch.uint8))
    return bb, ex


def _run(all_urls: list[str], urls: list[str], state: RunState, bb: Backbone, ex: Extractor, cfg: EmbedConfig,
         devices: list[str] | None) -> Summary:
    t0 = time.time()
    names = output_names(all_urls)  # from the full list, so every rank names every shard alike
    summary = Summary(state.out, shards_total=len(urls))
    pending = [u for u in urls if not state.is_done(u, names[u])]
    # Temporary files a killed run left (ours alone: this rank's shards; the folder's own files with one rank)
    store.remove_stale_temps(state.emb_dir, [f"{names[u]}.parquet" for u in urls])
    store.remove_stale_temps(state.state_dir, [f"{names[u]}{x}" for u in urls for x in (".json", ".failed.json")])
    if state.lock.name == "_lock":
        store.remove_stale_temps(state.out, ["run.json", "_SUCCESS"])
    summary.shards_skipped = len(urls) - len(pending)
    if pending and cfg.engine == "ray":
        from .ray_engine import run_with_ray

        run_with_ray(pending, names, str(state.out), cfg, summary, cfg.ray_address)
    elif pending and devices:
        from .devices import run_on_devices

        run_on_devices(pending, names, str(state.out), cfg, devices, summary)
    elif pending:
        workers = cfg.workers if cfg.workers is not None else default_workers(ex.device)
        bar = tqdm(desc="embed", unit="img", disable=cfg.quiet, dynamic_ncols=True, smoothing=0.1)
        try:
            for i, (url, rec, reason) in enumerate(iter_embedded(pending, names, state, bb, ex, cfg, workers, bar)):
                bar.set_postfix_str(f"shards {i + 1}/{len(pending)}")
                summary.add(url, rec, reason)
        finally:
            bar.close()
    summary.seconds = time.time() - t0
    # The last rank to finish sees every shard of the full list done and marks the folder complete.
    if not summary.failed and all(state.is_done(u, names[u]) for u in all_urls):
        state.mark_success()
    return summary


def embed_one_shard(url: str, name: str, state: RunState, bb: Backbone, ex: Extractor, cfg: EmbedConfig,
                    workers: int) -> tuple[ShardRecord | None, str | None]:
    """The unit of work of every engine: one shard in, one committed Parquet file (or a failure) out."""
    for _, rec, reason in iter_embedded([url], {url: name}, state, bb, ex, cfg, workers, None):
        return rec, reason
    raise AssertionError("the reader ends every shard")


def iter_embedded(pending: list[str], names: dict[str, str], state: RunState, bb: Backbone, ex: Extractor,
                  cfg: EmbedConfig, workers: int, bar: tqdm | None) -> Iterator[tuple[str, ShardRecord | None, str | None]]:
    """Stream ``pending`` shards through the DataLoader and the model; yield each shard once it is committed."""
    threads = torch.get_num_threads() if workers == 0 else 1
    data = ShardSamples(pending, bb.preprocess, cfg.batch_size, cfg.keep, cfg.max_pixels, decode_threads=threads)
    loader = DataLoader(data, batch_size=None, num_workers=workers, pin_memory=ex.device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        multiprocessing_context="fork" if workers and os.name == "posix" else None)
    meta = shard_metadata(bb, ex, cfg)
    buffers: dict[str, _ShardBuffer] = {}
    crash = _Crash()
    # A finished shard is committed (Parquet encoding, fsync, done record) by one writer thread while the next
    # one is decoded and embedded; one thread, so shards are committed one at a time and in order.
    writer = ThreadPoolExecutor(1, thread_name_prefix="commit")
    committing: deque[tuple[str, _ShardBuffer, Future]] = deque()

    def committed(keep: int) -> Iterator[tuple[str, ShardRecord | None, str | None]]:
        """The shards committed so far, in order; waits for the oldest while more than ``keep`` are pending."""
        while committing and (len(committing) > keep or committing[0][2].done()):
            url, buf, job = committing.popleft()
            rec = job.result()
            yield url, rec, (buf.failed or "unknown") if rec is None else None

    try:
        for piece in loader:
            buf = buffers.setdefault(piece.url, _ShardBuffer())
            emb = _embed_batch(ex, piece.images, cfg.normalize, cfg.out_dtype) if len(piece.keys) else None
            buf.add(piece, emb)
            if bar is not None:
                bar.update(len(piece.keys))
            crash.tick(len(piece.keys))
            if buf.ends < max(1, workers):
                continue
            del buffers[piece.url]
            committing.append((piece.url, buf, writer.submit(_finish, piece.url, names[piece.url], buf, state, meta, cfg)))
            yield from committed(keep=1)  # bounds memory: one finished shard in the writer's hands at a time
        yield from committed(keep=0)
    finally:
        writer.shutdown(wait=True)  # a commit under way completes (also on SIGTERM): its shard is not redone


def _finish(url: str, name: str, buf: _ShardBuffer, state: RunState, meta: dict[str, Any],
            cfg: EmbedConfig) -> ShardRecord | None:
    """Commit one shard (Parquet, then its done record) or record why it failed."""
    elapsed = time.time() - buf.started
    if buf.failed:
        log.error("shard %s failed: %s", url, buf.failed)
        state.record_failure(url, name, buf.failed)
        return None
    pieces = buf.pieces
    order = np.argsort(np.concatenate([p.indices for p, _ in pieces])) if pieces else np.array([], dtype=int)
    cat = (lambda xs: [xs[i] for i in order])  # noqa: E731  (rows back in shard order)
    dim = meta["dim"]
    emb = np.concatenate([e for _, e in pieces])[order] if pieces else np.zeros((0, dim), dtype=cfg.out_dtype)
    extra = {k: cat([v for p, _ in pieces for v in p.extra[k]]) for k in cfg.keep}
    extra = {k: v for k, v in extra.items() if any(x is not None for x in v)}
    if buf.seen == 0:
        log.warning("no samples found in %s; is it the right file?", url)
    try:
        return state.commit(url, name, keys=cat([k for p, _ in pieces for k in p.keys]),
                     indices=cat([i for p, _ in pieces for i in p.indices]),
                     labels=cat([lab for p, _ in pieces for lab in p.labels]), embeddings=emb, extra=extra,
                     metadata=meta, seen=buf.seen, skipped=sorted(buf.skipped), seconds=elapsed)
    except OSError as e:  # disk full, permissions: this shard fails and is retried next run
        log.error("cannot write the output of %s: %s", url, e)
        buf.failed = f"write failed: {e}"
        state.record_failure(url, name, buf.failed)
        return None


def embed_images(paths: Sequence[str], meta: dict[str, Any], device: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Embed image files exactly as the embed stage did for ``meta`` (an embedding shard's metadata).

    Returns the float32 ``[N, D]`` embeddings and what was used (model, weights digest, layer,
    preprocessing), so callers can refuse to compare embeddings of different models.
    """
    from .backbones import Preprocess
    from .reader import SkipSample, decode_rgb, resize_crop

    weights = meta.get("weights") or "default"
    if weights.startswith("embedded:"):
        weights = "default"
    bb = load_backbone(meta["model"], weights, meta.get("layer"))
    want = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else bb.preprocess
    if want.input_size != bb.preprocess.input_size:
        bb = with_input_size(bb, want.input_size)
    if meta.get("weights_sha256") and meta["weights_sha256"] != bb.weights_sha256:
        raise UserError(f"the weights {meta.get('weights')} loaded here differ from those that made the embeddings "
                        f"(sha256 {bb.weights_sha256[:12]} vs {meta['weights_sha256'][:12]}); pass the same weights file")
    images = []
    for p in paths:
        try:
            images.append(resize_crop(decode_rgb(Path(p).read_bytes(), want.resize_size), want))
        except SkipSample as e:
            raise UserError(f"cannot use image {p}: {e}") from None
    precision = meta.get("precision", "auto")
    if precision == "fp16" and resolve_device(device).type == "cpu":
        precision = "fp32"  # GPU-made fp16 embeddings, queried from a CPU: fp32 is the closest CPU can do
    ex = build_extractor(bb, device, precision, "eager")
    vectors = _embed_batch(ex, torch.stack(images), bool(meta.get("normalize", True)), "float32")
    used = {"model": bb.spec, "weights_sha256": bb.weights_sha256, "layer": bb.layer,
            "preprocess": want.to_dict()}
    return vectors, used
