"""Reduced precision for the frozen network: fp16 casts, and bf16 with the full-resolution stem kept in fp32."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

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


def in_precision(model: nn.Module, precision: str, input_size: int) -> tuple[nn.Module, torch.dtype]:
    """``model`` (a copy unless fp32) in ``precision``, and the dtype its input must have."""
    if precision == "fp32":
        return model, torch.float32
    original, model = model, copy.deepcopy(model)  # hooks and casts must not leak into the caller's backbone
    if precision == "bf16" and isinstance(model, torch.jit.ScriptModule):
        log.info("bf16: a TorchScript file takes no per-layer hooks; the whole module runs in bf16")
        return model.to(torch.bfloat16), torch.bfloat16
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
