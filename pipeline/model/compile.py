"""uint8 images in, float32 features out: the wrapped backbone, TorchScript/inductor/eager, the on-disk compile cache."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import atomic
from ..version import __version__
from . import micro_batch as micro_batches
from .backbones import Backbone
from .deprecations import quiet_cuda_home_notice, torchscript_calls
from .device import (
    DEFAULT_COMPILE,
    FIXED_BATCH_MODES,
    TORCH_COMPILE_MODES,
    check_compile_mode,
    resolve_device,
    resolve_precision,
)
from .fold_bn import fold_batch_norms
from .packaged import PackagedModule
from .precision import Autocast, in_precision
from .preprocess import UInt8Normalize

log = logging.getLogger(__name__)
BF16_STEM_RULE = 2  # part of the cache key: bump when precision.to_bf16_keep_stem changes which layers stay fp32
AOT_BN_RULE = 1  # part of an aot package's name: bump when fold_bn changes what it folds


class UInt8Features(nn.Module):
    """Takes uint8 ``[B,3,H,W]`` images, normalises on the device, runs the backbone in ``dtype``, returns float32."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                 channels_last: bool):
        super().__init__()
        self.normalize = UInt8Normalize(mean, std)
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


@dataclass
class Extractor:
    """A ready feature extractor and how it was built."""

    module: nn.Module
    device: torch.device
    precision: str
    compile: str
    dim: int
    cache_path: Path | None = None
    cache_hit: bool = False
    fixed_batch: int | None = None  # inductor graphs and aot packages are built for one batch size: pad smaller ones
    micro_batch: int = 0  # run the model on chunks of this many images (0: the whole batch at once)
    batch_size: int | None = None  # the batch the embed stage feeds it (measured on a GPU: model/tuning.py)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.device, non_blocking=True)
        if 0 < self.micro_batch < x.shape[0]:
            return torch.cat([self._forward(chunk) for chunk in x.split(self.micro_batch)])
        return self._forward(x)

    def embed(self, images_uint8: torch.Tensor, normalize: bool, dtype: str) -> np.ndarray:
        """Embeddings as stored: L2-normalised when asked, as a numpy array of ``dtype``."""
        feats = self(images_uint8)
        if normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats.cpu().numpy().astype(dtype, copy=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compile not in FIXED_BATCH_MODES:
            return self.module(x)
        n = x.shape[0]
        if self.fixed_batch is None:
            self.fixed_batch = n
        if n < self.fixed_batch:  # the last, short batch of a run would otherwise cost a full recompile
            pad = x.new_zeros((self.fixed_batch - n, *x.shape[1:]))
            return self.module(torch.cat([x, pad]))[:n]
        # Always an inference tensor (as the padded batch is): a mix of the two kinds fails dynamo's guards.
        return self.module(x.clone() if self.compile in TORCH_COMPILE_MODES else x)


def default_cache_dir() -> Path:
    """``$EMBEDPIPE_CACHE``, else ``$XDG_CACHE_HOME/embedpipe`` (``~/.cache/embedpipe``)."""
    env = os.environ.get("EMBEDPIPE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedpipe"


def cache_key(bb: Backbone, precision: str, device: torch.device, channels_last: bool) -> str:
    """What a compiled module depends on: the model's identity, precision, device type, torch and embedpipe."""
    parts = {**bb.identity.to_dict(), "precision": precision, "device": device.type,
             "input": bb.preprocess.input_size, "channels_last": channels_last, "torch": torch.__version__,
             "embedpipe": __version__, "bf16_stem_rule": BF16_STEM_RULE}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _trace(wrapper: nn.Module, size: int, device: torch.device) -> torch.jit.ScriptModule:
    """Trace and freeze (weights become constants). Saved in this form: the optimised form does not reload."""
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, device=device)
    with torch.inference_mode(False), torch.no_grad(), torchscript_calls():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def _optimize(module: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    # Fuses conv+bn and picks oneDNN kernels on CPU; done after every load, it is cheap.
    if device.type != "cpu":
        return module
    with torchscript_calls():
        return torch.jit.optimize_for_inference(module)


def _load_cached(path: Path, device: torch.device) -> torch.jit.ScriptModule | None:
    if not path.is_file():
        return None
    try:
        with torchscript_calls():
            return torch.jit.load(str(path), map_location=device)
    except Exception as e:  # a corrupt or foreign file: rebuild rather than crash
        log.warning("compile cache entry %s is unreadable (%s); rebuilding it", path, e)
        path.unlink(missing_ok=True)
        return None


def _save_cached(module: torch.jit.ScriptModule, path: Path) -> None:
    # Other workers loading at the same time see the old file or the whole new one.
    with atomic.replacing(path) as tmp, torchscript_calls():
        torch.jit.save(module, tmp)


def build_extractor(
    bb: Backbone,
    device: str = "auto",
    precision: str = "auto",
    compile: str = DEFAULT_COMPILE,
    cache_dir: str | Path | None = None,
    channels_last: bool | None = None,
    micro_batch: int | None = None,
    measure: bool = True,
) -> Extractor:
    """Wrap a backbone into a uint8 -> float32 features module on ``device``, compiled and cached.

    ``micro_batch=None`` on CPU takes the count measured for this model and machine; ``measure=False`` (query
    time: someone is waiting) never measures it, using the remembered one or ``micro_batch.DEFAULT``.

    Example:
        >>> ex = build_extractor(load_backbone("resnet18", weights="none"), device="cpu", compile="eager")
        >>> ex(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape
        torch.Size([2, 512])
    """
    check_compile_mode(compile)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    micro = micro_batches.resolve(micro_batch, dev)
    source, folded = fold_batch_norms(bb.model) if compile == "aot" else (bb.model, 0)
    if folded:
        log.debug("aot: %d batch norms folded into their convolutions", folded)
    model, in_dtype = in_precision(source, prec, bb.preprocess.input_size, dev)
    if isinstance(model, Autocast) and compile != "eager":
        log.info("--compile %s: a TorchScript file under autocast runs as loaded (it is compiled already, and "
                 "compiling it again would drop the autocast); recorded as eager", compile)
        compile = "eager"
    if channels_last is None:
        channels_last = dev.type == "cuda" or compile != "eager"
    wrapper = UInt8Features(model, bb.preprocess.mean, bb.preprocess.std, in_dtype, channels_last)
    wrapper = wrapper.to(device=dev)
    if channels_last:
        wrapper.model.to(memory_format=torch.channels_last)
    wrapper.eval()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(bb, prec, dev, channels_last)
    quiet_cuda_home_notice()  # before inductor (inductor, aot) is imported
    if compile == "eager":
        ex = Extractor(wrapper, dev, prec, compile, bb.num_features, micro_batch=micro)
    elif compile in TORCH_COMPILE_MODES:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants: fold BN, prepack conv weights (inference only)
        mode = TORCH_COMPILE_MODES[compile]
        log.info("compiling %s for %s/%s with inductor (mode %s) at the first batch (cached in %s)", bb.spec,
                 dev.type, prec, mode, cache / "inductor")
        ex = Extractor(torch.compile(wrapper, dynamic=False, mode=mode), dev, prec, compile, bb.num_features,
                       cache / "inductor", micro_batch=micro)
    elif compile == "aot":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))  # AOTInductor's build files
        module = PackagedModule(wrapper, dev, cache / "aot", f"{key}-bn{AOT_BN_RULE}", bb.spec, prec)
        ex = Extractor(module, dev, prec, compile, bb.num_features, cache / "aot", micro_batch=micro)
    else:
        path = cache / "torchscript" / f"{key}.pt"
        module = _load_cached(path, dev)
        hit = module is not None
        if module is None:
            log.info("compiling %s for %s/%s with TorchScript (first run for this model here; cached in %s)",
                     bb.spec, dev.type, prec, cache)
            module = _trace(wrapper, bb.preprocess.input_size, dev)
            try:
                _save_cached(module, path)
            except OSError as e:  # a read-only cache dir costs a recompile next time, nothing more
                log.warning("cannot write compile cache %s: %s", path, e)
        ex = Extractor(_optimize(module, dev), dev, prec, compile, bb.num_features, path, hit, micro_batch=micro)
    if micro == micro_batches.TUNE:
        ex.micro_batch = micro_batches.remembered(cache / "micro_batch.json", f"{key}-{compile}", ex._forward,
                                                  bb.preprocess.input_size, measure_now=measure)
        ex.fixed_batch = ex.micro_batch if compile in FIXED_BATCH_MODES else None
    return ex
