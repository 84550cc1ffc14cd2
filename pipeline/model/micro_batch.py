"""How many images the model takes per call on CPU: measured once per model and machine, then remembered.

A few images at a time keep each layer's activations in the core's L2 cache; a whole batch streams them
through memory. The best count depends on the model and the machine, so it is measured (README, Performance).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..errors import UserError

log = logging.getLogger(__name__)

CANDIDATES = (4, 8)
TUNE = -1  # "measure it": what resolve() returns for the default on CPU


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


def remembered(cache_file: Path, key: str, forward: Callable[[torch.Tensor], torch.Tensor], input_size: int) -> int:
    """The measured micro-batch for ``key``, from ``cache_file`` or measured now and stored there."""
    key = f"{key}-threads{torch.get_num_threads()}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), int):
        return known[key]
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
