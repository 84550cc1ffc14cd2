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
