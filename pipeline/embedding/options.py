"""The embed stage's options (validated before any data or device is touched) and the summary of a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..errors import UserError
from ..model.device import (COMPILE_AUTO, CPU_PRECISIONS, DEVICE_AUTO, check_compile_mode, resolve_device,
                            resolve_precision)
from ..model.decoders import decoder_names
from ..model.image_header import DEFAULT_MAX_PIXELS
from ..model.specs import DEFAULT_MODEL
from ..records import ModelIdentity
from ..threads import usable_cpus
from .tar import DEFAULT_MAX_MEMBER_MB, DEFAULT_MAX_SHARD_GB, KEEPABLE

OUT_DTYPES = tuple(store.DTYPES)


@dataclass(frozen=True)
class Fingerprint:
    """What makes two runs' embeddings interchangeable: the model identity and how its vectors were stored. A
    folder holds one fingerprint (``run.json``); a run with another is refused."""

    identity: ModelIdentity
    precision: str
    dtype: str
    normalize: bool
    keep: tuple[str, ...]

    # The options that decide each part: a rerun whose run.json records the same values of these is known to
    # have the same fingerprint without loading the model.
    DECIDED_BY = {"identity": ("model", "weights", "layer", "input_size", "preprocess"), "precision": ("precision",),
                  "dtype": ("out_dtype",), "normalize": ("normalize",), "keep": ("keep",)}

    def to_dict(self) -> dict[str, Any]:
        """As ``run.json`` records it (the identity fields beside the others)."""
        return {**self.identity.to_dict(), "precision": self.precision, "dtype": self.dtype,
                "normalize": self.normalize, "keep": sorted(self.keep)}


EMBEDDING_OPTIONS = tuple(o for options in Fingerprint.DECIDED_BY.values() for o in options)


@dataclass(frozen=True)
class EmbedConfig:
    """Every option of the embed stage; validated before any data or device is touched."""

    model: str = DEFAULT_MODEL
    weights: str = "default"
    layer: str | None = None
    input_size: int | None = None
    # a TorchScript file's preprocessing by hand: a JSON object or its file (the runner keeps the object's text)
    preprocess: str | None = None
    compile: str = COMPILE_AUTO  # measured: model/tuning.py
    precision: str = "auto"
    device: str = DEVICE_AUTO
    batch_size: int | None = None  # 64 on a CPU; measured on a GPU (model/tuning.py)
    micro_batch: int | None = None
    workers: int | None = None
    decode: str = "auto"  # a decoder's name (model/decoders/) or auto: the default on a CPU, measured on a GPU
    out_dtype: str = "float16"
    normalize: bool = True
    keep: tuple[str, ...] = KEEPABLE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_mb: float = DEFAULT_MAX_MEMBER_MB
    max_shard_gb: float = DEFAULT_MAX_SHARD_GB
    cache_dir: str | None = None
    overwrite: bool = False
    quiet: bool = False
    devices: str | None = None
    engine: str = "local"  # a name in the engine registry (embedding/engines/), which checks it
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
        """Every option but ``engine``, whose names and rules the engine registry owns (``engines.engine_for``,
        which the runner calls right after this: engines build on these options, so this module cannot ask them)."""
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.decode != "auto" and self.decode not in decoder_names():
            raise UserError(f"--decode must be auto or a decoder ({', '.join(decoder_names())}), got {self.decode!r}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise UserError(f"--micro-batch must be 0 (whole batch) or more, got {self.micro_batch}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        if self.out_dtype not in OUT_DTYPES:
            raise UserError(f"--out-dtype must be {' or '.join(OUT_DTYPES)}, got {self.out_dtype!r}")
        bad = [k for k in self.keep if k not in KEEPABLE]
        if bad:
            raise UserError(f"--keep accepts {', '.join(KEEPABLE)}; got {', '.join(bad)}")
        if self.input_size is not None and not 16 <= self.input_size <= 2048:
            raise UserError(f"--input-size must be between 16 and 2048 pixels, got {self.input_size}")
        if self.max_pixels < 1:
            raise UserError("--max-pixels must be positive")
        for flag, value in (("--max-member-mb", self.max_member_mb), ("--max-shard-gb", self.max_shard_gb)):
            if not value > 0:  # also NaN
                raise UserError(f"{flag} must be a positive number of {flag[-2:].upper()}, got {value}")
        usable_cpus()  # a bad EMBEDPIPE_THREADS is refused here, before the lock and the model
        if self.preprocess is not None:
            from ..model.sources import check_preprocess_option

            self.preprocess_changes()
            check_preprocess_option(self.model)
        self._check_placement()

    def preprocess_changes(self) -> dict[str, Any] | None:
        """``--preprocess`` read and checked (``model/preprocess.read_changes``), or None without it."""
        from ..model.preprocess import read_changes  # torchvision: only when the option is given

        return read_changes(self.preprocess) if self.preprocess is not None else None

    def device_list(self) -> list[str] | None:
        """``--devices`` as torch device strings (None without it)."""
        return parse_devices(self.devices) if self.devices else None

    def _check_placement(self) -> None:
        """The compile mode, and the precision on each device the model will run on, with the messages of
        ``model/device.py``. Here, before the lock and the model, so that a bad choice costs nothing. torch is
        imported only where the answer depends on the machine (a CUDA device, fp16) or to raise the error: a
        rerun with nothing to do (the defaults, or ``--device cpu``) stays without it."""
        check_compile_mode(self.compile, auto=True)
        for device in self.device_list() or [self.device]:
            if device in (DEVICE_AUTO, "cpu") and self.precision in ("auto", *CPU_PRECISIONS):
                continue  # valid on any machine
            resolve_precision(self.precision, resolve_device(device))


def parse_devices(spec: str) -> list[str]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,cuda:2`` | ``cpu,cpu`` | ``N`` -> a list of torch device strings.

    Example:
        >>> parse_devices("cpu,cpu")
        ['cpu', 'cpu']
    """
    import torch  # the CUDA devices this machine has

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


@dataclass
class EmbedSummary:
    """What one run did; ``failed`` maps shard url -> reason. Every engine reports each shard through :meth:`add`."""

    out: Path
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_elsewhere: int = 0  # being embedded by another run at the same time (claimed): left to it
    failed: dict[str, str] = field(default_factory=dict)
    embedded: int = 0
    skipped: int = 0
    seconds: float = 0.0  # embedding: from the first shard read to the last commit
    setup_seconds: float = 0.0  # before that: expanding specs, loading and compiling the model
    started: float = field(default=0.0, repr=False)

    @property
    def images_per_s(self) -> float:
        """The embedding rate (setup excluded: it is paid once per run, whatever its size)."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def finished(self) -> int:
        """Shards this run has an outcome for (done or failed)."""
        return self.shards_done + len(self.failed)

    def add(self, url: str, embedded: int = 0, skipped: int = 0, failed: str | None = None) -> None:
        """One shard's outcome: committed with ``embedded`` rows and ``skipped`` samples, or ``failed`` (a reason)."""
        if failed is not None:
            self.failed[url] = failed or "unknown"
        else:
            self.shards_done += 1
            self.embedded += embedded
            self.skipped += skipped

    def __repr__(self) -> str:
        return f"EmbedSummary({self.line()})"

    def line(self) -> str:
        """``embedded 300 samples (0 skipped) from 3/3 shards (0 already done, 0 failed) in 2.5s, 120.0 img/s,
        after 9.8s of setup (model load and compile) -> run``; a run with nothing to do says so instead."""
        head = (f"embedded {self.embedded} samples ({self.skipped} skipped) from "
                f"{self.shards_done + self.shards_skipped}/{self.shards_total} shards "
                f"({self.shards_skipped} already done, {len(self.failed)} failed"
                + (f", {self.shards_elsewhere} being embedded by another run)" if self.shards_elsewhere else ")"))
        if not self.finished:
            return f"{head}: nothing to do ({self.setup_seconds:.1f}s, no model loaded) -> {self.out}"
        return (f"{head} in {self.seconds:.1f}s, {self.images_per_s:.1f} img/s, after {self.setup_seconds:.1f}s of "
                f"setup (model load and compile) -> {self.out}")
