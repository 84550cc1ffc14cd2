"""``--compile aot``: the wrapped model compiled ahead of time by AOTInductor, one package per batch size.

A package (``<cache key>-b<batch>.pt2``: the generated kernels as a shared library plus the weights) is built
on the first call with a batch size and kept in the compile cache; a warm start loads it in about a second,
where ``torch.compile`` (``--compile inductor``) traces the model with dynamo again in every process (15 s
warm here, TorchScript 5-6 s). Its kernels ran 0.84x as fast as ``torch.compile``'s (README, Performance).
``torch.export`` + AOTInductor is what torch recommends in place of TorchScript for deployment.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import atomic

log = logging.getLogger(__name__)


class PackagedModule:
    """Calls ``wrapper`` through AOTInductor packages, built (or loaded from ``cache_dir``) per batch size."""

    def __init__(self, wrapper: nn.Module, device: torch.device, cache_dir: Path, key: str, spec: str,
                 precision: str):
        self.wrapper, self.device, self.cache_dir, self.key = wrapper, device, cache_dir, key
        self.spec, self.precision = spec, precision
        self.compiled: dict[int, Callable[[torch.Tensor], Any]] = {}
        self.loaded_from_cache = 0  # packages loaded from the cache rather than built in this process

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n not in self.compiled:
            self.compiled[n] = self._load_or_build(n, x)
        out = self.compiled[n](x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def path(self, batch: int) -> Path:
        return self.cache_dir / f"{self.key}-b{batch}.pt2"

    def _load_or_build(self, batch: int, example: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        path = self.path(batch)
        if path.is_file():
            try:
                model = _load(path, self.device)
                self.loaded_from_cache += 1
                return model
            except Exception as e:  # a corrupt or foreign file: rebuild rather than crash
                log.warning("compile cache entry %s is unreadable (%s); rebuilding it", path, e)
                path.unlink(missing_ok=True)
        log.info("compiling %s for %s/%s, batches of %d, with AOTInductor (once for this model here: about a "
                 "minute on a CPU; cached in %s)", self.spec, self.device.type, self.precision, batch, self.cache_dir)
        with torch.inference_mode(False), torch.no_grad():
            exported = torch.export.export(self.wrapper, (torch.zeros_like(example, device=self.device),))
        package = io.BytesIO()
        torch._inductor.aoti_compile_and_package(exported, package_path=package, inductor_configs={"freezing": True})
        try:
            atomic.write_bytes(path, package.getvalue())
        except OSError as e:  # a read-only cache: this process runs the package from memory, the next compiles
            log.warning("cannot write compile cache %s: %s", path, e)
            package.seek(0)
            return _load(package, self.device)
        return _load(path, self.device)


def _load(source: Any, device: torch.device) -> Callable[[torch.Tensor], Any]:
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                           else -1)
    return torch._inductor.aoti_load_package(source, device_index=index)
