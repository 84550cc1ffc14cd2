"""``--precision auto`` on a CPU: bf16 where the CPU has bf16 matrix units and the model keeps its fidelity, else fp32.

bf16 runs on AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16 units several times faster than fp32; without
them it is emulated and slower. Whether a model keeps its features in bf16 is measured, not assumed: the min
cosine between its bf16 and fp32 features on real images of the run (``MIN_COSINE``). Both facts are checked
once per machine, model and torch (``measured.remembered``, the cache of the other measured choices).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import UserError
from . import measured
from .backbones import Backbone
from .compile import build_extractor, cache_key, default_cache_dir

log = logging.getLogger(__name__)

CPU_CHOICES = ("fp32", "bf16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix units
FAKE_ENV = "EMBEDPIPE_CPU_BF16"  # "1"/"0": take this CPU as having bf16 units or not (tests; forcing fp32)
MIN_COSINE = 0.999  # bf16's min cosine to fp32 on the run's images below which auto keeps fp32
PROBE_IMAGES = 64  # images of the run the fidelity is measured on: 16 found 0.99975 for the default backbone, 1,024 found 0.9967


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` resolved to on this machine, the measured cosine (None when not measured) and why."""

    precision: str
    cosine: float | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bf16_units(environ: Mapping[str, str] = os.environ, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The bf16 matrix unit this CPU has (``amx_bf16`` or ``avx512_bf16``), or None; ``EMBEDPIPE_CPU_BF16``
    overrides what ``/proc/cpuinfo`` says."""
    fake = environ.get(FAKE_ENV, "").strip()
    if fake in ("0", "1"):
        return f"bf16 units ({FAKE_ENV}=1)" if fake == "1" else None
    if fake:
        raise UserError(f"{FAKE_ENV}={fake!r}: use 1 (this CPU has bf16 units), 0 (it has none) or leave it unset")
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return next((f for f in BF16_FLAGS if f in flags), None)
    return None


def bf16_cosine(bb: Backbone, images: torch.Tensor, cache_dir: str | Path | None = None) -> float:
    """The min cosine between the model's bf16 features, TorchScript-compiled as the embed stage starts it, and
    its eager fp32 features on ``images`` (uint8 ``[N,3,S,S]``); -1.0 when bf16 cannot run the model at all.

    Compiled, not eager: TorchScript's freezing folds batch norms into bf16 weights, a rounding eager bf16 does
    not have (the default backbone: eager 0.99948, the embedded run 0.9967 on 1,024 images)."""
    fp32 = build_extractor(bb, "cpu", "fp32", "eager", micro_batch=0)
    try:
        bf16 = build_extractor(bb, "cpu", "bf16", "torchscript", cache_dir, micro_batch=0)  # the run's cache
        low = bf16(images).float()
    except (UserError, RuntimeError) as e:
        log.warning("bf16 cannot run %s here (%s)", bb.spec, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return -1.0
    ref = fp32(images).float()
    if not torch.isfinite(low).all():
        return -1.0
    return float(torch.nn.functional.cosine_similarity(low, ref, dim=1).min())


def choose(bb: Backbone, read_images: Callable[[], torch.Tensor | None],
           cache_dir: str | Path | None = None) -> PrecisionChoice:
    """``auto`` on a CPU for ``bb``: bf16 when the CPU has bf16 units and bf16's min cosine to fp32 on the images
    ``read_images`` gives (some of the run's own; read only where bf16 is possible) is at least ``MIN_COSINE``,
    else fp32. The cosine is measured once per machine, model and torch and remembered in the cache folder."""
    units = bf16_units()
    if units is None:
        return PrecisionChoice("fp32", None, "this CPU has no bf16 matrix units (AMX-BF16 or AVX512-BF16)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cpu = torch.device("cpu")
    key = f"{cache_key(bb, 'bf16', cpu, True)}|{measured.machine(cpu)}"
    seen = {"images": 0}

    def measure() -> float | None:
        images = read_images()  # only when nothing is remembered: a shard is read for this once per machine
        if images is None or not len(images):
            return None
        seen["images"] = len(images)
        return bf16_cosine(bb, images, cache)

    cos = measured.remembered(cache / "precision.json", key, measure,
                              lambda v: isinstance(v, (int, float)) and -1.0 <= v <= 1.0 + 1e-6,
                              f"bf16's fidelity to fp32 for {bb.spec}")
    on = f"on {seen['images']} images of this run" if seen["images"] else "on the images of its first run here"
    if cos is None:
        return PrecisionChoice("fp32", None, "no decodable image to measure bf16's fidelity on")
    if cos >= MIN_COSINE:
        return PrecisionChoice("bf16", cos, f"this CPU has {units}, and bf16's min cosine to fp32 {on} is "
                                            f"{cos:.5f} (>= {MIN_COSINE})")
    return PrecisionChoice("fp32", cos, f"bf16's min cosine to fp32 {on} is {cos:.5f}, below {MIN_COSINE}: bf16 "
                                        "would change this model's embeddings")

