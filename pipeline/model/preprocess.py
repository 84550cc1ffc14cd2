"""How images must look on the way in: the preprocessing record, resize + centre crop, and the one uint8 normaliser."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError

INTERPOLATIONS = ("bilinear", "bicubic")  # what resize_crop and the exported classifiers can do


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

    def changed(self, changes: Mapping[str, Any]) -> "Preprocess":
        """This preprocessing with the fields of ``changes`` (checked by :func:`read_changes`) replaced; timm's
        ``crop_pct`` sets ``resize_size = floor(input_size / crop_pct)``."""
        changes = dict(changes)
        crop_pct = changes.pop("crop_pct", None)
        new = replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})
        if crop_pct is not None:
            new = replace(new, resize_size=int(new.input_size / crop_pct))
        if new.resize_size < new.input_size:
            raise UserError(f"preprocessing {new.to_dict()}: resize_size {new.resize_size} is below input_size "
                            f"{new.input_size} (the centre crop would pad); give a resize_size of at least "
                            f"{new.input_size}, or a crop_pct of at most 1")
        return new


def read_changes(value: str | Mapping[str, Any], what: str = "--preprocess") -> dict[str, Any]:
    """A preprocessing given by hand (``--preprocess``): a JSON object, inline or in a file, with any of
    ``input_size``, ``resize_size`` or ``crop_pct``, ``interpolation``, ``mean``, ``std``; every field checked.

    Example:
        >>> read_changes('{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}')
        {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5], 'interpolation': 'bicubic'}
    """
    example = ('{"input_size": 224, "crop_pct": 1.0, "interpolation": "bicubic", "mean": [0.481, 0.458, 0.408], '
               '"std": [0.269, 0.261, 0.276]}')
    d: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):  # a file's name
            path = Path(text)
            if not path.is_file():
                raise UserError(f"{what} {value!r} is neither a JSON object nor a file; give one, e.g. {example}")
            text = path.read_text()
            what = f"{what} file {path}"
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} is not valid JSON ({e}); give an object, e.g. {example}") from None
    if not isinstance(d, Mapping) or not d:
        raise UserError(f"{what} must be a JSON object with at least one field, e.g. {example}")
    known = [f.name for f in fields(Preprocess)] + ["crop_pct"]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"{what}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(known)}")
    if "crop_pct" in d and "resize_size" in d:
        raise UserError(f"{what}: give resize_size or crop_pct, not both (crop_pct sets resize_size = input_size / "
                        "crop_pct)")
    for key in ("input_size", "resize_size"):
        if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool) or not 16 <= d[key] <= 4096):
            raise UserError(f"{what}: {key} must be a whole number of pixels from 16 to 4096, got {d[key]!r}")
    if "crop_pct" in d and not (isinstance(d["crop_pct"], (int, float)) and 0 < d["crop_pct"] <= 1):
        raise UserError(f"{what}: crop_pct must be a number in (0, 1], got {d['crop_pct']!r}")
    if "interpolation" in d and d["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"{what}: interpolation must be {' or '.join(INTERPOLATIONS)}, got {d['interpolation']!r}")
    for key in ("mean", "std"):
        v = d.get(key)
        if key in d and not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float))
                                                                          and not isinstance(x, bool) for x in v)):
            raise UserError(f"{what}: {key} must be a list of 3 numbers (R, G, B, for 0..1 pixels), got {v!r}")
    if "std" in d and min(d["std"]) <= 0:
        raise UserError(f"{what}: std must be positive, got {d['std']}")
    return {k: ([float(x) for x in v] if k in ("mean", "std") else v) for k, v in d.items()}


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
