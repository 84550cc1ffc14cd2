"""uint8 in, features out: precision, on-device normalisation, TorchScript/inductor/eager, on-disk compile cache."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__, micro_batch as micro_batches
from .backbones import Backbone
from .errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("torchscript", "inductor", "eager")


def resolve_device(device: str) -> torch.device:
    """``auto`` = first CUDA device if any, else CPU; a CUDA device that is not there is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = fp16 on CUDA, fp32 on CPU. fp16 on a CPU is refused (slow, often unsupported kernels)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use auto, fp32, fp16 or bf16")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on CPU; use --precision bf16 (or fp32)")
    return precision


class UInt8Features(nn.Module):
    """Takes uint8 ``[B,3,H,W]`` images, normalises on the device, runs the backbone in ``dtype``, returns float32."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                 channels_last: bool):
        super().__init__()
        self.model = model
        # (x/255 - mean)/std folded into one multiply-add, computed in float32 then cast once.
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1).float(),
                             persistent=False)
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() * self.scale + self.shift).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


def _cast_input(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def to_bf16_keep_stem(model: nn.Module, size: int) -> list[str]:
    """Cast to bfloat16 except the stem: the leading layers at >= 1/2 of the input size (1/4 with depthwise convs).

    bf16 keeps 8 bits of mantissa; in the first, full-resolution layers its rounding compounds through the
    whole network. Networks built of depthwise convolutions (9 products per output: nothing averages the
    rounding out) suffer most: the default backbone's min cosine to fp32 on upscaled real photos is 0.969
    all-bf16, 0.993 with the 1/2-resolution layers in fp32 and 0.999 with the 1/4-resolution ones; only the
    last keeps the embeddings within 0.99 of the tutorial loop's. For plain convolutions the 1/4-resolution
    stage is expensive to keep (ResNet-50: 19% of the FLOPs; 111 -> 76 img/s), so there only the stem stays.
    Every bf16 leaf casts its input, so residual additions that promote to fp32 stay correct. Returns the
    names of the layers kept in fp32.
    """
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())
    min_width = size // 4 if depthwise else size // 2
    order: list[tuple[str, int]] = []
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append((n, o.shape[-1] if torch.is_tensor(o)
                                                                          and o.ndim == 4 else 0)))
             for n, m in leaves]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    keep: list[str] = []
    for name, width in order:
        if width < min_width:
            break
        keep.append(name)
    for name, module in leaves:
        if name not in keep:
            module.to(torch.bfloat16)
            module.register_forward_pre_hook(_cast_input(torch.bfloat16))
    return keep


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
    fixed_batch: int | None = None  # inductor graphs are specialised to one batch size: pad smaller ones

    micro_batch: int = 0  # run the model on chunks of this many images (0: the whole batch at once)

    @torch.inference_mode()
    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.device, non_blocking=True)
        if 0 < self.micro_batch < x.shape[0]:
            return torch.cat([self._forward(chunk) for chunk in x.split(self.micro_batch)])
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compile != "inductor":
            return self.module(x)
        n = x.shape[0]
        if self.fixed_batch is None:
            self.fixed_batch = n
        if n < self.fixed_batch:  # the last, short batch of a run would otherwise cost a full recompile
            pad = x.new_zeros((self.fixed_batch - n, *x.shape[1:]))
            return self.module(torch.cat([x, pad]))[:n]
        # Always an inference tensor (as the padded batch is): a mix of the two kinds fails dynamo's guards.
        return self.module(x.clone())


def default_cache_dir() -> Path:
    env = os.environ.get("EMBEDPIPE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedpipe"


def cache_key(bb: Backbone, precision: str, device: torch.device, channels_last: bool) -> str:
    parts = {"model": bb.spec, "weights_sha256": bb.weights_sha256, "layer": bb.layer, "precision": precision,
             "device": device.type, "input": bb.preprocess.input_size, "preprocess": bb.preprocess.to_dict(),
             "channels_last": channels_last, "torch": torch.__version__, "embedpipe": __version__,
             "bf16_stem_rule": 2}  # bump when to_bf16_keep_stem changes which layers stay fp32
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _trace(wrapper: nn.Module, size: int, device: torch.device) -> torch.jit.ScriptModule:
    """Trace and freeze (weights become constants). Saved in this form: the optimised form does not reload."""
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, device=device)
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def _optimize(module: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    # Fuses conv+bn and picks oneDNN kernels on CPU; done after every load, it is cheap.
    return torch.jit.optimize_for_inference(module) if device.type == "cpu" else module


def _load_cached(path: Path, device: torch.device) -> torch.jit.ScriptModule | None:
    if not path.is_file():
        return None
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as e:  # a corrupt or foreign file: rebuild rather than crash
        log.warning("compile cache entry %s is unreadable (%s); rebuilding it", path, e)
        path.unlink(missing_ok=True)
        return None


def _save_cached(module: torch.jit.ScriptModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.jit.save(module, tmp)
        os.replace(tmp, path)  # other workers loading at the same time see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_extractor(
    bb: Backbone,
    device: str = "auto",
    precision: str = "auto",
    compile: str = "torchscript",
    cache_dir: str | Path | None = None,
    channels_last: bool | None = None,
    micro_batch: int | None = None,
) -> Extractor:
    """Wrap a backbone into a uint8 -> float32 features module on ``device``, compiled and cached.

    Example:
        >>> ex = build_extractor(load_backbone("resnet18", weights="none"), device="cpu", compile="eager")
        >>> ex(torch.zeros(2, 3, 224, 224, dtype=torch.uint8)).shape
        torch.Size([2, 512])
    """
    if compile not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {compile!r}; use one of {', '.join(COMPILE_MODES)}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    micro = micro_batches.resolve(micro_batch, dev)
    if channels_last is None:
        channels_last = dev.type == "cuda" or compile != "eager"
    model = bb.model
    if prec == "bf16":
        model = copy.deepcopy(model)  # hooks and casts must not leak into the caller's backbone
        kept = to_bf16_keep_stem(model, bb.preprocess.input_size)
        log.info("bf16: %d leading high-resolution layers kept in fp32", len(kept))
    elif prec != "fp32":
        model = copy.deepcopy(model).to(PRECISIONS[prec])
    in_dtype = torch.float32 if prec == "bf16" else PRECISIONS[prec]
    wrapper = UInt8Features(model, bb.preprocess.mean, bb.preprocess.std, in_dtype, channels_last)
    wrapper = wrapper.to(device=dev)
    if channels_last:
        wrapper.model.to(memory_format=torch.channels_last)
    wrapper.eval()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(bb, prec, dev, channels_last)
    if compile == "eager":
        ex = Extractor(wrapper, dev, prec, compile, bb.num_features, micro_batch=micro)
    elif compile == "inductor":
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants: fold BN, prepack conv weights (inference only)
        ex = Extractor(torch.compile(wrapper, dynamic=False), dev, prec, compile, bb.num_features, cache / "inductor",
                       micro_batch=micro)
    else:
        path = cache / "torchscript" / f"{key}.pt"
        module = _load_cached(path, dev)
        hit = module is not None
        if module is None:
            log.info("compiling %s (%s, %s) with TorchScript; cached at %s", bb.spec, prec, dev, path)
            module = _trace(wrapper, bb.preprocess.input_size, dev)
            try:
                _save_cached(module, path)
            except OSError as e:  # a read-only cache dir costs a recompile next time, nothing more
                log.warning("cannot write compile cache %s: %s", path, e)
        ex = Extractor(_optimize(module, dev), dev, prec, compile, bb.num_features, path, hit, micro_batch=micro)
    if micro == micro_batches.TUNE:
        ex.micro_batch = micro_batches.remembered(cache / "micro_batch.json", f"{key}-{compile}", ex._forward,
                                                  bb.preprocess.input_size)
        ex.fixed_batch = ex.micro_batch if compile == "inductor" else None
    return ex
