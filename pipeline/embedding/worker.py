"""The unit of work every engine runs: prepare the model once, then embed a shard into one committed Parquet file."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from ..model.backbones import Backbone, load_backbone
from ..model.compile import Extractor
from ..model.decode_choice import choose_decoder
from ..model.device import resolve_device, set_cpu_threads
from ..model.streams import StreamedEmbedder
from ..model.tuning import CPU_BATCH, tuned_extractor
from ..records import EmbeddingMeta
from ..threads import usable_cpus
from ..version import __version__
from .options import EmbedConfig, Fingerprint
from .feed import decoded_ahead, embedded
from .reader import Piece, ShardSamples
from .run_folder import RunState, ShardRecord

log = logging.getLogger(__name__)


def default_workers(device: torch.device, gpus: int = 1) -> int:
    """Decode workers: a GPU gets its share of the usable CPUs (``gpus`` processes on the node), up to 16. On CPU
    the model needs the cores, and decoding in-process (no worker, one decode thread per core between model
    calls) avoids oversubscribing small machines."""
    cores = usable_cpus()
    return max(1, min(cores // max(1, gpus), 16)) if device.type == "cuda" else cores // 4


def prepare_model(cfg: EmbedConfig, share: int = 1, bb: Backbone | None = None,
                  count_images: Callable[[], int] | None = None) -> tuple[Backbone, Extractor]:
    """The frozen backbone and its compiled extractor for ``cfg`` (the same in every engine and process); on a
    GPU the batch size (unless given) and ``--compile auto`` are measured here once, then remembered; on a CPU
    ``--compile auto`` takes the mode with the least expected time for the images ``count_images()`` counts
    (``model/tuning.py``).

    On CPU the model gets this process's part of the usable CPUs (``share`` processes run a model on them) less
    the decode workers, set before the micro-batch is measured for that thread count.
    """
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        workers = cfg.workers if cfg.workers is not None else default_workers(device)
        set_cpu_threads(workers, share)
    bb = bb or load_configured_backbone(cfg)
    ex = tuned_extractor(bb, cfg.device, cfg.precision, cfg.compile, cfg.cache_dir, cfg.micro_batch, cfg.batch_size,
                         count_images)
    return bb, ex


def batch_size(cfg: EmbedConfig, ex: Extractor) -> int:
    """The run's batch size: ``--batch-size``, else the one measured for ``ex`` (64 on a CPU)."""
    return cfg.batch_size or ex.batch_size or CPU_BATCH


def load_configured_backbone(cfg: EmbedConfig) -> Backbone:
    """The frozen backbone ``cfg`` names, at its input size (no extractor: nothing compiled or measured)."""
    given = cfg.preprocess_changes()
    bb = load_backbone(cfg.model, cfg.weights, cfg.layer, cfg.input_size, given)
    if given:
        log.info("%s: preprocessing from the command line (--preprocess %s): %s", bb.spec, cfg.preprocess,
                 bb.preprocess.to_dict())
    return bb


def fingerprint(bb: Backbone, precision: str, cfg: EmbedConfig) -> Fingerprint:
    """What makes two runs' embeddings interchangeable (``precision`` as resolved on the device that runs)."""
    return Fingerprint(bb.identity, precision, cfg.out_dtype, cfg.normalize, tuple(cfg.keep))


def shard_metadata(bb: Backbone, ex: Extractor, cfg: EmbedConfig) -> EmbeddingMeta:
    """The file metadata of every embedding shard: the backbone's identity and how the vectors were made."""
    return EmbeddingMeta(bb.identity, bb.num_features, cfg.out_dtype, ex.precision, ex.compile, cfg.normalize,
                         __version__)


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


def decode_worker_died(e: BaseException) -> bool:
    """Whether ``e`` is torch's report that a DataLoader worker process died (a native crash in a decoder, the
    OOM killer). It has no class of its own, and torch's SIGCHLD handler raises it wherever the main thread is."""
    return isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker")


def _ignore_sigterm(worker_id: int) -> None:
    # A scheduler's SIGTERM to the whole process group must stop the run through the main process (exit 143,
    # the lock released), not kill the decode workers under it (a DataLoader traceback).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_NO_IMAGES = torch.empty(0, dtype=torch.uint8)


class _ShardBuffer:
    """Rows of one shard collected from every worker until all of them report its end."""

    def __init__(self) -> None:
        self.pieces: list[tuple[Piece, np.ndarray]] = []
        self.ends = 0
        self.seen = 0
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[tuple[str, str]] = []
        self.failed: str | None = None
        self.started = time.time()

    def add(self, piece: Piece, emb: np.ndarray | None) -> None:
        # embedded: its pixels (pinned, or on the GPU) are not held until the commit; with whole shards per
        # DataLoader worker, up to one shard per worker waits for its end at once
        piece.images = _NO_IMAGES
        if emb is not None and len(piece.keys):
            self.pieces.append((piece, emb))
        self.skipped.extend(piece.skipped)
        self.warnings.extend(piece.warnings)
        self.seen += piece.seen
        if piece.failed and self.failed is None:
            self.failed = piece.failed
        self.ends += int(piece.end)


def embed_one_shard(url: str, name: str, state: RunState, bb: Backbone, ex: Extractor, cfg: EmbedConfig,
                    workers: int, progress: Any = None) -> tuple[ShardRecord | None, str | None]:
    """The unit of work of every engine: one shard in, one committed Parquet file (or a failure) out.

    ``progress.update(n)`` (optional) hears of every ``n`` images embedded. A decode worker process that dies on
    the shard fails it (recorded as a crash, so later runs embed it in a child process).
    """
    try:
        for _, rec, reason in iter_embedded([url], {url: name}, state, bb, ex, cfg, workers, progress):
            return rec, reason
    except RuntimeError as e:
        if not decode_worker_died(e):
            raise
        reason = f"{e} while decoding this shard (a native crash in a decoder, or out of memory?)"
        log.error("shard %s failed: %s", url, reason)
        state.record_failure(url, name, reason, crashed=True)
        return None, reason
    raise AssertionError("the reader ends every shard")


def quiet_worker_handoffs() -> None:
    """A decode worker killed while handing a batch over (a native crash in a decoder) makes multiprocessing's
    descriptor-sharing thread print a traceback of its own and go on serving; the run already says what
    happened and retries the shard, so that one error becomes a log line. Everything else reaches the hook."""
    hook = sys.excepthook
    if getattr(hook, "embedpipe_handoffs", False):
        return

    def quiet(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if threading.current_thread().name.endswith("(_serve)") and issubclass(
                kind, (OSError, EOFError, multiprocessing.AuthenticationError)):
            log.warning("a decode worker died while handing over a batch (%s: %s)", kind.__name__, value)
            return
        hook(kind, value, tb)

    quiet.embedpipe_handoffs = True  # type: ignore[attr-defined]
    sys.excepthook = quiet


def iter_embedded(pending: list[str], names: dict[str, str], state: RunState, bb: Backbone, ex: Extractor,
                  cfg: EmbedConfig, workers: int, bar: Any = None,
                  decoder: str | None = None) -> Iterator[tuple[str, ShardRecord | None, str | None]]:
    """Stream ``pending`` shards through the DataLoader and the model; yield each shard once it is committed.

    ``decoder`` (a registered name) overrides ``cfg.decode``. On a GPU the batches are copied in and out on side
    streams and a batch's embeddings are read once the next one is queued (``feed.py``)."""
    threads = torch.get_num_threads() if workers == 0 else 1
    if workers:
        quiet_worker_handoffs()
    decoder = decoder or choose_decoder(cfg.decode, bb, ex, workers, cfg.cache_dir)
    data = ShardSamples(pending, bb.preprocess, batch_size(cfg, ex), cfg.keep, cfg.max_pixels, decode_threads=threads,
                        decoder=decoder, max_member_mb=cfg.max_member_mb, max_shard_gb=cfg.max_shard_gb)
    loader = DataLoader(data, batch_size=None, num_workers=workers, pin_memory=ex.device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        multiprocessing_context="fork" if workers and os.name == "posix" else None,
                        worker_init_fn=_ignore_sigterm if workers else None)
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

    embedder = StreamedEmbedder(ex, cfg.normalize, cfg.out_dtype)
    # A piece whose decoder runs here (not in the workers) is decoded in one call on the model's device, a batch
    # ahead; its embeddings come a batch behind.
    pieces = embedded(decoded_ahead(loader, data, embedder.streams), embedder)
    try:
        for piece, emb in pieces:
            buf = buffers.setdefault(piece.url, _ShardBuffer())
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
        pieces.close()  # the device decode thread ends before the loader's workers are shut down
        writer.shutdown(wait=True)  # a commit under way completes (also on SIGTERM): its shard is not redone


def _finish(url: str, name: str, buf: _ShardBuffer, state: RunState, meta: EmbeddingMeta,
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
    dim = meta.dim
    emb = np.concatenate([e for _, e in pieces])[order] if pieces else np.zeros((0, dim), dtype=cfg.out_dtype)
    extra = {k: cat([v for p, _ in pieces for v in p.extra[k]]) for k in cfg.keep}
    extra = {k: v for k, v in extra.items() if any(x is not None for x in v)}
    if buf.seen == 0:
        log.warning("no samples found in %s; is it the right file?", url)
    try:
        return state.commit(url, name, keys=cat([k for p, _ in pieces for k in p.keys]),
                            indices=cat([i for p, _ in pieces for i in p.indices]),
                            labels=cat([lab for p, _ in pieces for lab in p.labels]), embeddings=emb, extra=extra,
                            metadata=meta, seen=buf.seen, skipped=sorted(buf.skipped), seconds=elapsed,
                            warnings=sorted(buf.warnings))
    except OSError as e:  # disk full, permissions: this shard fails and is retried next run
        log.error("cannot write the output of %s: %s", url, e)
        buf.failed = f"write failed: {e}"
    except (ValueError, OverflowError, pa.ArrowException) as e:  # a value the reader let through that Parquet
        # refuses: this shard fails with the reason (and the others go on) rather than the whole run
        log.error("cannot store the rows of %s: %s", url, e)
        buf.failed = f"cannot store its rows: {type(e).__name__}: {e}"
    state.record_failure(url, name, buf.failed)
    return None


def outcome(rec: ShardRecord | None, reason: str | None) -> dict[str, Any]:
    """A shard's result as :meth:`EmbedSummary.add` takes it (and as engines send it between processes)."""
    if rec is None:
        return {"failed": reason or "unknown"}
    return {"embedded": rec.embedded, "skipped": len(rec.skipped)}
