"""What the embed stage measures on a GPU before its first run of a model there: the batch size (when none is
given) and, with ``--compile auto``, the compile mode; each once per machine and model, then remembered in the
cache folder (``measured.py``). On a CPU nothing is measured here: batches of 64 and TorchScript.
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


def images_per_s(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, seconds: float, warmup: int = 2) -> float:
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
    while time.perf_counter() - t0 < seconds:
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
                    batch_size: int | None = None) -> Extractor:
    """:func:`build_extractor` with what is left to measure decided: ``batch_size`` None is 64 on a CPU and
    measured on a GPU; ``compile="auto"`` is TorchScript on a CPU and the fastest mode measured on a GPU. The
    extractor's ``batch_size`` says the batch chosen; a fixed-batch mode is compiled for it here.
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
            compile = DEFAULT_COMPILE
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
