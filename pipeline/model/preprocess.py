"""How images must look on the way in: the preprocessing record, resize + centre crop, and the one uint8 normaliser."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Preprocess:
    """How images must look on the way in: resize shorter side, centre crop, normalise."""

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class UInt8Normalize(nn.Module):
    """uint8 ``[B,3,H,W]`` images -> ``(x/255 - mean)/std`` in float32, folded into one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))
        shift = -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
        # Not in the state dict: derived from the preprocessing record, which travels with every output.
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


def resize_crop(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side to ``resize_size`` (antialiased), then centre-crop to ``input_size``; stays uint8."""
    mode = InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR
    img = TF.resize(img, [pre.resize_size], interpolation=mode, antialias=True)
    return TF.center_crop(img, [pre.input_size, pre.input_size])


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``short``, rounded as torchvision's resize rounds."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def resize_crop_batch(images: Sequence[torch.Tensor], pre: Preprocess, chunk: int = 128) -> list[torch.Tensor]:
    """:func:`resize_crop` for many uint8 ``[3, H, W]`` images on any device: images of one size are resized in
    one call (a GPU runs a few kernels per size, not per image), in float32 with antialiasing, then rounded.

    float32 on every device, so the arithmetic a CPU test checks is the one a GPU runs (torchvision's uint8
    kernel exists on the CPU only); results differ from :func:`resize_crop` by rounding, at most a level or two.
    """
    mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for (h, w), members in by_size.items():
        size = resized_size(h, w, pre.resize_size)
        for start in range(0, len(members), chunk):  # bounds the float32 copy of a group of large images
            part = members[start:start + chunk]
            x = torch.stack([images[i] for i in part])
            if size != (h, w):
                x = nn.functional.interpolate(x.float(), size=size, mode=mode, align_corners=False, antialias=True)
            x = TF.center_crop(x, [pre.input_size, pre.input_size])
            if x.dtype != torch.uint8:
                x = x.clamp_(0, 255).round_().to(torch.uint8)
            for i, crop in zip(part, x.unbind(0)):
                out[i] = crop
    return out  # type: ignore[return-value]
