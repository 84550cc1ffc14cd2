"""Choices measured once per machine and model, then remembered: one JSON file per kind of choice in the cache
folder, keyed by what the measurement depends on (the model's compile-cache key, the machine, torch).

The pattern of ``micro_batch.py``'s measurement, for the choices made on a GPU: the batch size, the compile mode
(``--compile auto``) and the decoder (``--decode auto``).
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .. import atomic
from ..threads import usable_cpus

log = logging.getLogger(__name__)
T = TypeVar("T")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """The machine as a measurement sees it: CPU model, cores this process may use, the device's name, torch."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{_cpu_name()}|{usable_cpus()} cores|{gpu}|torch {torch.__version__}"


def remembered(cache_file: Path, key: str, measure: Callable[[], T], valid: Callable[[Any], bool], what: str) -> T:
    """The value stored for ``key`` in ``cache_file`` when ``valid`` accepts it, else ``measure()``, stored there.

    ``what`` names the choice in the log (``"the batch size"``). A cache that cannot be read or written costs a
    measurement next time, nothing more.
    """
    known = read_all(cache_file)
    if key in known and valid(known[key]):
        return known[key]
    log.info("measuring %s on this machine (once; remembered in %s)", what, cache_file)
    value = measure()
    log.info("%s measured here: %s", what, value)
    store(cache_file, key, value)
    return value


def read_all(cache_file: Path) -> dict[str, Any]:
    """Every entry of a measurement file; an unreadable or foreign file is empty."""
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def store(cache_file: Path, key: str, value: Any) -> None:
    """Set ``key`` in a measurement file; one that cannot be written costs a measurement next time, nothing more."""
    known = read_all(cache_file)
    known[key] = value
    try:
        atomic.write_json(cache_file, known)
    except OSError as e:
        log.warning("cannot write %s: %s", cache_file, e)
