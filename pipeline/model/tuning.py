"""What the embed stage measures before its first run of a model on a machine: on a GPU the batch size (when none
is given) and, with ``--compile auto``, the fastest compile mode; on a CPU, with ``--compile auto`` (the default),
each mode's model rate and setup time, from which every run takes the mode with the least expected time for its
images. Each once per machine and model, then remembered in the cache folder (``measured.py``).
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import measured
from .backbones import Backbone
from .compile import Extractor, build_extractor, cache_key, default_cache_dir
from .device import COMPILE_AUTO, DEFAULT_COMPILE, FIXED_BATCH_MODES, resolve_device, resolve_precision

log = logging.getLogger(__name__)

CPU_BATCH = 64  # the batch size on a CPU, and wherever nothing was measured
BATCH_CANDIDATES = (64, 128, 256, 512)
CUDA_COMPILE_CANDIDATES = ("torchscript", "inductor", "max-autotune", "aot")
TIE = 0.03  # rates closer than this are a tie: the earlier candidate (the smaller batch, the cheaper build) wins


def pick(rates: dict[Any, float], tie: float = TIE) -> Any:
    """The first candidate (in ``rates``' order) within ``tie`` of the fastest.

    Example:
        >>> pick({64: 1000.0, 128: 1400.0, 256: 1420.0, 512: 1500.0})
        512
        >>> pick({64: 1000.0, 128: 1480.0, 256: 1500.0})
        128
    """
    best = max(rates.values())
    return next(k for k, r in rates.items() if r >= best * (1 - tie))


def images_per_s(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, seconds: float, warmup: int = 2,
                 max_calls: int | None = None) -> float:
    """Images per second of ``forward`` on batch ``x``, timed for about ``seconds`` after ``warmup`` calls (TorchScript
    profiles its first calls, then optimises); on a GPU the clock is read after the device has finished (a few calls
    queued between reads)."""
    def finished() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):
        forward(x)
    finished()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and (max_calls is None or n < max_calls * len(x)):
        for _ in range(4 if x.is_cuda else 1):
            forward(x)
            n += len(x)
        finished()
    return n / (time.perf_counter() - t0)


def measure_batch_size(forward: Callable[[torch.Tensor], Any], input_size: int, device: torch.device,
                       candidates: Sequence[int] = BATCH_CANDIDATES, seconds: float = 1.0) -> int:
    """The batch size among ``candidates`` whose model rate is the best (:func:`pick`); one the device has no
    memory for ends the search."""
    rates: dict[int, float] = {}
    for b in candidates:
        try:
            x = torch.randint(0, 256, (b, 3, input_size, input_size), dtype=torch.uint8, device=device)
            forward(x)
            rates[b] = images_per_s(forward, x, seconds)
        except torch.OutOfMemoryError:
            log.info("batch %d does not fit on %s; measured up to the one before", b, device)
            break
        finally:
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not rates:
        raise RuntimeError(f"no batch of {candidates[0]} images fits on {device}; give --batch-size")
    log.info("model rate by batch size: %s", ", ".join(f"{b}: {r:.0f} img/s" for b, r in rates.items()))
    return pick(rates)


def measure_compile(build: Callable[[str], Extractor], batch: int, input_size: int, device: torch.device,
                    candidates: Sequence[str] = CUDA_COMPILE_CANDIDATES,
                    seconds: float = 2.0) -> tuple[str, dict[str, Extractor]]:
    """The fastest compile mode at ``batch`` (:func:`pick`; a mode that cannot build here is left out) and the
    extractors built, so that the winner is not built twice."""
    x = torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8, device=device)
    rates: dict[str, float] = {}
    built: dict[str, Extractor] = {}
    for mode in candidates:
        t0 = time.perf_counter()
        try:
            ex = build(mode)
            ex(x)  # the compile, for inductor and aot
        except Exception as e:  # noqa: BLE001  (no compiler, no triton...: that mode is not a candidate here)
            log.warning("compile mode %s cannot run here (%s: %s); not a candidate", mode, type(e).__name__, e)
            continue
        built[mode] = ex
        rates[mode] = images_per_s(ex, x, seconds)
        log.info("compile mode %s: %.0f img/s at batch %d (built in %.0f s)", mode, rates[mode], batch,
                 time.perf_counter() - t0)
    if not rates:
        raise RuntimeError("no compile mode could be built here")
    return pick(rates), built


def tuned_extractor(bb: Backbone, device: str = "auto", precision: str = "auto", compile: str = DEFAULT_COMPILE,
                    cache_dir: str | Path | None = None, micro_batch: int | None = None,
                    batch_size: int | None = None, count_images: Callable[[], int] | None = None) -> Extractor:
    """:func:`build_extractor` with what is left to measure decided: ``batch_size`` None is 64 on a CPU and
    measured on a GPU; ``compile="auto"`` is the fastest mode measured on a GPU, and on a CPU the mode with the
    least expected time for the images ``count_images()`` counts (:func:`cpu_auto_extractor`). The extractor's ``batch_size``
    says the batch chosen; a fixed-batch mode is compiled for it here.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cuda = dev.type == "cuda"
    channels_last = cuda or compile != "eager"
    key = f"{cache_key(bb, prec, dev, channels_last)}|{measured.machine(dev)}"
    size = bb.preprocess.input_size
    batch = batch_size or CPU_BATCH
    if batch_size is None and cuda:
        batch = measured.remembered(cache / "batch_size.json", key, lambda: _measure_batch(bb, dev, prec, cache),
                                    lambda v: isinstance(v, int) and v > 0, f"the batch size of {bb.spec}")
    built: dict[str, Extractor] = {}
    if compile == COMPILE_AUTO:
        if not cuda:
            ex = cpu_auto_extractor(bb, prec, cache, micro_batch, count_images, key)
            ex.batch_size = batch
            return ex
        else:
            def measure() -> str:
                chosen, built_now = measure_compile(
                    lambda mode: build_extractor(bb, dev, prec, mode, cache, micro_batch=micro_batch), batch, size, dev)
                built.update(built_now)
                return chosen
            compile = measured.remembered(cache / "compile.json", f"{key}|batch {batch}", measure,
                                          lambda v: v in CUDA_COMPILE_CANDIDATES, f"the compile mode of {bb.spec}")
    ex = built.pop(compile, None) or build_extractor(bb, dev, prec, compile, cache, micro_batch=micro_batch)
    built.clear()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    ex.batch_size = batch
    if compile in FIXED_BATCH_MODES:  # compiled now, at the run's batch size, not inside the timed loop
        ex(torch.zeros(batch, 3, size, size, dtype=torch.uint8, device=dev))
    return ex


def _measure_batch(bb: Backbone, dev: torch.device, prec: str, cache: Path) -> int:
    # Eager in the run's precision and layout: built at once, and batch sizes rank alike in every mode (a
    # fixed-batch mode would be compiled once per candidate).
    ex = build_extractor(bb, dev, prec, "eager", cache, micro_batch=0, channels_last=True)
    try:
        return measure_batch_size(ex, bb.preprocess.input_size, dev)
    finally:
        del ex


# --compile auto on a CPU. A compiled mode costs its build before the first batch (tens of seconds on 2 cores for a
# ResNet-50; inductor's again in every process: its graph cache refuses frozen weights, while an aot package loads
# in about a second once built); TorchScript builds in seconds. So the choice is the least expected time, setup +
# images / rate, from rates and setups measured here, and guesses for modes never built here.
CPU_COMPILE_CANDIDATES = ("torchscript", "aot", "inductor")  # on a tie the earlier (cheaper to build) wins
GUESSES = {"aot": (30.0, 1.5), "inductor": (40.0, 1.5)}  # a never-measured mode: (first build s, rate / TorchScript's)
DEFAULT_EXPECTED_IMAGES = 10_000  # a run whose size is unknown: img2dataset's default shard
# Below this many images a guessed compile cannot pay back for any TorchScript rate above 22 img/s (it pays where
# images / rate * (1 - 1 / gain) > first build): such a run starts at once, nothing measured.
SMALL_RUN_IMAGES = 2_000
RATE_SECONDS = 2.0  # how long one mode's model rate is timed at most ...
RATE_CALLS = 3  # ... or this many batches, whichever comes first (a small model is timed in a fraction of a second)


def expected_seconds(entry: dict[str, float], images: int) -> float:
    """A mode's expected time for ``images``: its measured setup, then the images at its measured rate."""
    return entry["setup_s"] + images / entry["rate"]


def cpu_auto_extractor(bb: Backbone, prec: str, cache: Path, micro_batch: int | None,
                       count_images: Callable[[], int] | None, key: str) -> Extractor:
    """``--compile auto`` on a CPU: the mode among :data:`CPU_COMPILE_CANDIDATES` with the least expected time for
    this run's images (``count_images()``, called only here: counting reads the shards; None =
    :data:`DEFAULT_EXPECTED_IMAGES`), from each mode's rate and
    setup measured on this machine (``cpu_compile.json``), and :data:`GUESSES` for modes never built here.
    TorchScript is measured first (unless the run is too small for any compile to pay back); where a guess wins,
    every compiled mode whose guess beats TorchScript is built, measured and remembered, and the fastest runs."""
    counted = count_images() if count_images else 0
    images = counted if counted > 0 else DEFAULT_EXPECTED_IMAGES
    path = cache / "cpu_compile.json"
    entry_key = f"{key}|threads {torch.get_num_threads()}"
    known = _read_rates(path, entry_key)
    size = bb.preprocess.input_size
    x = torch.randint(0, 256, (CPU_BATCH, 3, size, size), dtype=torch.uint8)

    def build(mode: str) -> tuple[Extractor, float]:
        """The mode built and called once (inductor compiles there), and the seconds that took."""
        t0 = time.perf_counter()
        ex = build_extractor(bb, "cpu", prec, mode, cache,
                             micro_batch=micro_batch if mode == "torchscript" else _micro(micro_batch, known))
        ex(x)
        return ex, time.perf_counter() - t0

    def measured(mode: str) -> Extractor:
        ex, setup = build(mode)
        if mode == "aot":  # later runs load the package it wrote: their setup is that load
            ex, setup = build(mode)
        rate = images_per_s(ex, x, RATE_SECONDS, max_calls=RATE_CALLS)
        known[mode] = {"rate": rate, "setup_s": setup, "micro_batch": ex.micro_batch}
        _write_rate(path, entry_key, mode, known[mode])
        log.info("compile mode %s: %.1f img/s (model alone, batches of %d), setup %.1f s", mode, rate, CPU_BATCH,
                 setup)
        return ex

    if "torchscript" not in known and images < SMALL_RUN_IMAGES:
        log.info("--compile auto: torchscript (%d images: too few for a compile to pay back)", images)
        return build_extractor(bb, "cpu", prec, "torchscript", cache, micro_batch=micro_batch)
    ts = measured("torchscript") if "torchscript" not in known else None
    base = known["torchscript"]
    entries = {m: known.get(m) or {"setup_s": GUESSES[m][0], "rate": base["rate"] * GUESSES[m][1]}
               for m in CPU_COMPILE_CANDIDATES}
    times = {m: expected_seconds(e, images) for m, e in entries.items()}
    best = min(CPU_COMPILE_CANDIDATES, key=times.get)
    log.info("--compile auto: %s (expected time for %d images: %s)", best, images,
             ", ".join(f"{m} {t:.0f} s{'' if m in known else ' (guessed)'}" for m, t in times.items()))
    if best == "torchscript":
        return ts or build_extractor(bb, "cpu", prec, "torchscript", cache, micro_batch=micro_batch)
    if best in known:  # measured before: built (a warm cache loads it), its setup kept up to date
        ex, setup = build(best)
        _write_rate(path, entry_key, best, {**known[best], "setup_s": setup})
        return ex
    # A guess won: every compiled mode whose guess beats TorchScript is built and measured now (once per machine),
    # and the one with the least time left for the images runs; later runs choose from measurements alone.
    built = {m: measured(m) for m in CPU_COMPILE_CANDIDATES[1:] if m not in known and times[m] < times["torchscript"]}
    left = {m: images / known[m]["rate"] for m in built}
    left["torchscript"] = images / base["rate"] + (0.0 if ts else base["setup_s"])
    pick = min(left, key=left.get)
    log.info("--compile auto: %s runs (measured: %s)", pick,
             ", ".join(f"{m} {known[m]['rate']:.1f} img/s" for m in ("torchscript", *built)))
    return built[pick] if pick in built else ts or build_extractor(bb, "cpu", prec, "torchscript", cache,
                                                                   micro_batch=micro_batch)


def _micro(given: int | None, known: dict[str, dict[str, float]]) -> int | None:
    """A compiled mode's micro-batch: the one given, else TorchScript's measured one (measuring its own would
    compile it once per candidate size)."""
    if given is not None:
        return given
    micro = known.get("torchscript", {}).get("micro_batch")
    return int(micro) if isinstance(micro, (int, float)) and micro >= 0 else None


def _read_rates(path: Path, key: str) -> dict[str, dict[str, float]]:
    entry = measured.read_all(path).get(key)
    ok = lambda v: isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) and v[k] > 0  # noqa: E731
                                               for k in ("rate", "setup_s"))
    return {m: v for m, v in entry.items() if m in CPU_COMPILE_CANDIDATES and ok(v)} if isinstance(entry, dict) else {}


def _write_rate(path: Path, key: str, mode: str, value: dict[str, float]) -> None:
    entry = measured.read_all(path).get(key)
    measured.store(path, key, {**(entry if isinstance(entry, dict) else {}), mode: value})
