"""The ``timm`` source: ``timm:<name>`` (and bare names, looked up here first), with the classifier reset to none."""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import UserError
from ..backbones import Classifier
from ..preprocess import Preprocess
from ..weights import check_online
from ..text import TextTower
from . import did_you_mean, text_refusal
from ._classifiers import ClassifierLibrary

_CLIP_SIZES = {"base": "B", "large": "L", "huge": "H", "giant": "g", "gigantic": "bigG"}


def open_clip_spec(name: str) -> str:
    """The open_clip spec of a timm CLIP tower: ``vit_base_patch32_clip_224.openai`` -> ``open_clip:ViT-B-32/openai``
    (timm ports those weights from open_clip; a tag open_clip spells otherwise is left for the user to pick)."""
    arch, _, tag = name.partition(".")
    m = re.fullmatch(r"vit_([a-z]+)_patch(\d+)_clip_(?:quickgelu_)?(\d+)", arch)
    if not m or m.group(1) not in _CLIP_SIZES:
        return "open_clip:ARCH/PRETRAINED (`open_clip.list_pretrained()` lists them)"
    res = "" if m.group(3) == "224" else f"-{m.group(3)}"
    arch = f"ViT-{_CLIP_SIZES[m.group(1)]}-{m.group(2)}{res}"
    try:  # open_clip's own tag when it is installed: timm's "laion2b" is open_clip's "laion2b_s32b_b79k"
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(arch)
        tag = tag if tag in tags else next((t for t in tags if tag and t.startswith(tag)), "")
    except ImportError:
        pass
    return f"open_clip:{arch}/{tag or 'PRETRAINED'}"


@functools.lru_cache(maxsize=None)
def model_names() -> frozenset[str]:
    """timm's model names, built once per process: ``timm.list_models()`` walks every registered model.

    A model registered with timm after the first call is not seen; register plugins' models before resolving specs.
    """
    import timm

    return frozenset(timm.list_models())


def _create(name: str, pretrained: bool) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    import timm
    from timm.data import resolve_data_config

    if pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
        cached = hub_id and (Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub" /
                             f"models--{hub_id.replace('/', '--')}").is_dir()
        if not cached:
            check_online("huggingface.co", f"timm weights for {name}")
    model = timm.create_model(name, pretrained=pretrained)
    dc = resolve_data_config({}, model=model)
    size = dc["input_size"][-1]
    pre = Preprocess(size, int(round(size / dc.get("crop_pct", 0.875))), dc.get("interpolation", "bicubic"),
                     tuple(dc["mean"]), tuple(dc["std"]))
    # head_hidden_size: models with a pre-logits layer after pooling (MobileNetV3: 960 -> 1280) feed that to the head
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    head = {"attr": model.pretrained_cfg.get("classifier", "classifier"), "in_features": dim}
    return model, pre, head


@dataclass(frozen=True)
class TimmSource(ClassifierLibrary):
    """timm's models; pretrained weights from the Hugging Face hub, or embedded in a package (the default)."""

    name: str = "timm"
    argument: str = "<name>"
    about: str = "timm's image models (`timm.list_models()` lists them)"
    bare_order: int | None = 0
    runs_code: bool = False
    has_classifier: bool = True
    has_text_tower: bool = False

    names = staticmethod(model_names)
    create = staticmethod(_create)

    def check(self, name: str) -> None:
        if name.split(".", 1)[0] not in model_names():  # "resnet50.a1_in1k": a model and its pretrained tag
            raise UserError(f"timm has no model {name!r}.{did_you_mean(name, model_names(), f'{self.name}:')} "
                            "`timm.list_models()` lists them all")

    def text_tower(self, name: str, weights: str = "default") -> TextTower:
        if "_clip_" not in name:
            raise text_refusal(f"{self.name}:{name}")
        raise text_refusal(f"{self.name}:{name}", f"timm's CLIP models are image towers only, and embed gives their "
                           f"features before CLIP's projection, which no text embedding is comparable with; embed "
                           f"the images with {open_clip_spec(name)} instead (pip install 'embedpipe[clip]'): its "
                           "image tower stores the projected CLIP embedding and its text tower embeds the queries")

    def drop_head(self, clf: Classifier) -> tuple[nn.Module, dict[str, Any]]:
        # timm's own way: also drops pre-logits dropout and keeps the pooling (remove_head would miss both)
        clf.model.reset_classifier(0)
        return clf.model, clf.head


SOURCE = TimmSource()
