"""The ``torchvision`` source: ``torchvision:<name>`` (bare names after timm), with the last head Linear removed."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ..backbones import Classifier
from ..layers import remove_head
from ..preprocess import Preprocess
from ..weights import check_online
from . import did_you_mean
from ._classifiers import ClassifierLibrary


@functools.lru_cache(maxsize=None)
def model_names() -> frozenset[str]:
    """torchvision's classification models, built once per process."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _create(name: str, pretrained: bool) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    import torchvision

    pre = Preprocess()
    try:
        w = torchvision.models.get_model_weights(name).DEFAULT
        t = w.transforms()
        pre = Preprocess(t.crop_size[0], t.resize_size[0], t.interpolation.value, tuple(t.mean), tuple(t.std))
    except Exception:  # models without registered weights keep ImageNet defaults
        w = None
    if not pretrained:
        return torchvision.models.get_model(name, weights=None), pre, {}
    if w is None:
        raise UserError(f"torchvision:{name} has no default weights; pass --weights PATH or none")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not cached.is_file():
        check_online("download.pytorch.org", f"torchvision weights for {name}")
    return torchvision.models.get_model(name, weights=w), pre, {}


@dataclass(frozen=True)
class TorchvisionSource(ClassifierLibrary):
    """torchvision's classification models; pretrained weights from download.pytorch.org."""

    name: str = "torchvision"
    argument: str = "<name>"
    about: str = "torchvision's classification models (`torchvision.models.list_models()` lists them)"
    bare_order: int | None = 1
    runs_code: bool = False
    has_classifier: bool = True
    has_text_tower: bool = False

    names = staticmethod(model_names)
    create = staticmethod(_create)

    def check(self, name: str) -> None:
        if name not in model_names():
            raise UserError(f"torchvision has no classification model {name!r}."
                            f"{did_you_mean(name, model_names(), f'{self.name}:')} "
                            "`torchvision.models.list_models()` lists them all")

    def drop_head(self, clf: Classifier) -> tuple[nn.Module, dict[str, Any]]:
        return remove_head(clf.model, clf.spec)


SOURCE = TorchvisionSource()
