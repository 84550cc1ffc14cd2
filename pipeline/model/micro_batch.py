"""How many images the model takes per call on CPU: measured once per model and machine, then remembered.

A few images at a time keep each layer's activations in the core's L2 cache; a whole batch streams them
through memory. The best count depends on the model and the machine, so it is measured (README, Performance)
and remembered per model, compile mode, thread count, torch version and CPU model: a new machine or a new torch
measures again. Query-time callers (the service, search by image) never measure: they take what is remembered,
else :data:`DEFAULT`.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..errors import UserError

log = logging.getLogger(__name__)

CANDIDATES = (4, 8)
TUNE = -1  # "measure it": what resolve() returns for the default on CPU
DEFAULT = CANDIDATES[0]  # nothing remembered, no measuring (query time); a query of 1-4 images is one call


def resolve(micro_batch: int | None, device: torch.device) -> int:
    """``None``: measured on CPU (:data:`TUNE`), the whole batch (0) on GPU; 0 = always the whole batch."""
    if micro_batch is None:
        return TUNE if device.type == "cpu" else 0
    if micro_batch < 0:
        raise UserError(f"--micro-batch must be 0 (whole batch) or more, got {micro_batch}")
    return micro_batch


def _seconds_per_image(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, images: int) -> float:
    calls = max(1, images // len(x))
    t0 = time.perf_counter()
    for _ in range(calls):
        forward(x)
    return (time.perf_counter() - t0) / (calls * len(x))


def measure(forward: Callable[[torch.Tensor], torch.Tensor], input_size: int, rounds: int = 3) -> int:
    """The candidate with the lowest time per image; rounds alternate so a burst of load hits all alike."""
    x = torch.randint(0, 256, (max(CANDIDATES), 3, input_size, input_size), dtype=torch.uint8)
    for m in CANDIDATES:  # warm-up (and, for inductor, the compile for this size)
        forward(x[:m])
    best = {m: float("inf") for m in CANDIDATES}
    for _ in range(rounds):
        for m in CANDIDATES:
            best[m] = min(best[m], _seconds_per_image(forward, x[:m], max(CANDIDATES)))
    return min(best, key=best.get)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows: a measurement holds for that CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def entry_key(key: str) -> str:
    """What a measurement depends on besides the model (``key``): threads, torch and the CPU it ran on."""
    return f"{key}-threads{torch.get_num_threads()}-torch{torch.__version__}-{cpu_model()}"


def remembered(cache_file: Path, key: str, forward: Callable[[torch.Tensor], torch.Tensor], input_size: int,
               measure_now: bool = True) -> int:
    """The measured micro-batch for ``key`` on this machine, from ``cache_file``, or measured now and stored
    there; with ``measure_now=False`` (a query waiting), :data:`DEFAULT` when none is stored."""
    key = entry_key(key)
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), int):
        return known[key]
    if not measure_now:
        log.debug("no micro-batch measured for this model here yet; model calls of %d images (embedpipe embed "
                  "measures it)", DEFAULT)
        return DEFAULT
    log.info("measuring how many images per model call run fastest here (%s; once, remembered in %s)",
             " or ".join(map(str, CANDIDATES)), cache_file)
    value = measure(forward, input_size)
    log.info("model calls of %d images measured fastest on this machine", value)
    known[key] = value
    try:
        atomic.write_json(cache_file, known)
    except OSError as e:  # a read-only cache costs a measurement next time, nothing more
        log.warning("cannot write %s: %s", cache_file, e)
    return value
