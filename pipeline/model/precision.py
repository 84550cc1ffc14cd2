"""Reduced precision for the frozen network: fp16 casts, bf16 with the full-resolution stem kept in fp32, and a
TorchScript file cast whole or, where its graph fixes steps to fp32, run under autocast."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import UserError
from .device import torch_dtype

log = logging.getLogger(__name__)


def _cast_input(dtype: torch.dtype):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def to_bf16_keep_stem(model: nn.Module, size: int) -> list[str]:
    """Cast to bfloat16 except the stem: the leading layers at >= 1/2 of the input size (1/4 with depthwise convs).

    bf16 keeps 8 bits of mantissa; in the first, full-resolution layers its rounding compounds through the
    whole network. Depthwise convolutions (9 products per output: nothing averages the rounding out) suffer
    most, so such networks keep their 1/4-resolution layers in fp32 too; for plain convolutions that stage
    is expensive to keep, so only the stem stays (README, Performance: the measured cosines and rates).
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


def in_precision(model: nn.Module, precision: str, input_size: int,
                 device: torch.device | None = None) -> tuple[nn.Module, torch.dtype]:
    """``model`` (a copy unless fp32) in ``precision``, and the dtype its input must have. A TorchScript file is
    tried on one image on ``device`` first (:func:`script_in_precision`)."""
    if precision == "fp32":
        return model, torch.float32
    if isinstance(model, torch.jit.ScriptModule):
        return script_in_precision(model, precision, input_size, device or torch.device("cpu"))
    original, model = model, copy.deepcopy(model)  # hooks and casts must not leak into the caller's backbone
    if precision == "bf16":
        kept = to_bf16_keep_stem(model, input_size)
        try:
            with torch.inference_mode():
                model(torch.zeros(1, 3, input_size, input_size))
        except RuntimeError as e:
            # Parameters used outside a leaf layer (a ViT's projection matrix, `x @ self.proj`) stay fp32 and meet
            # bf16 activations, which a matmul does not promote: such a network runs wholly in bf16.
            log.info("bf16: the network mixes fp32 parameters with bf16 layers (%s); it runs wholly in bf16",
                     str(e).splitlines()[0])
            return copy.deepcopy(original).to(torch.bfloat16), torch.bfloat16
        log.info("bf16: %d leading high-resolution layers kept in fp32", len(kept))
        return model, torch.float32  # the fp32 stem takes fp32; each bf16 layer casts its own input
    return model.to(torch_dtype(precision)), torch_dtype(precision)


class Autocast(nn.Module):
    """A TorchScript file run in fp32 under autocast: its matmuls and convolutions take ``dtype``, and the steps
    its graph fixes to fp32 stay fp32. Tracing this wrapper would drop the autocast (a trace records the ops, not
    the context), so it runs as it is, the file being compiled already."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x)


MIN_PROBE_COSINE = 0.9  # a reduced-precision run this far from fp32 on the test image is broken, not rounded


def script_in_precision(model: torch.jit.ScriptModule, precision: str, input_size: int,
                        device: torch.device) -> tuple[nn.Module, torch.dtype]:
    """A TorchScript file in fp16 or bf16: cast whole (a fixed graph takes no per-layer casts) when that runs, else
    under autocast, else refused, each tried on one seeded image on ``device`` before any shard is read.

    A file traced in fp32 has its casts to "the input's dtype" fixed to float32 (open_clip's towers: the class
    and positional embeddings, LayerNorm's cast back): cast whole it meets bf16 weights with float32 activations
    and fails; scripted, the casts follow the input. The try also refuses NaN, inf and features far from fp32's.
    """
    dtype = torch_dtype(precision)
    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x).float()  # the file as loaded: fp32, on the CPU
    whole = copy.deepcopy(model).to(device=device, dtype=dtype)
    cast_failed = _probe(whole, x.to(device, dtype), ref)
    if cast_failed is None:
        log.info("%s: a TorchScript file takes no per-layer hooks; the whole module runs in %s", precision, precision)
        return whole, dtype
    del whole
    auto = Autocast(copy.deepcopy(model).to(device), dtype)
    autocast_failed = _probe(auto, x.to(device), ref)
    if autocast_failed is None:
        log.info("%s: the TorchScript file fails cast whole (%s: its graph fixes some steps to fp32, as a file "
                 "traced in fp32 does); it runs under %s autocast instead", precision, cast_failed, precision)
        return auto, torch.float32
    raise UserError(f"this TorchScript file cannot run in {precision}: cast whole it fails ({cast_failed}), under "
                    f"autocast too ({autocast_failed}); use --precision fp32, or save the model with "
                    "torch.jit.script instead of torch.jit.trace (a traced graph keeps the dtypes it was traced in)")


def _probe(module: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why ``module`` cannot stand in for the fp32 file on ``x`` (one line), or None when it can."""
    try:
        with torch.inference_mode():
            out = module(x).float().cpu()
    except RuntimeError as e:  # TorchScript's errors are RuntimeErrors; the last line is torch's own message
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(e).__name__
    if not torch.isfinite(out).all():
        return "its features hold NaN or inf"
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min())
    return None if cos >= MIN_PROBE_COSINE else f"its features are at cosine {cos:.3f} from fp32's"
