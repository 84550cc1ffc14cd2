"""Backbones: the frozen feature extractor type and the one entry that loads one from a spec (its source does the
work, `model/sources/`), plus what the sources share: seeded creation and weights, freezing, the dim check."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import UserError
from ..records import ModelIdentity
from .layers import take_layer
from .preprocess import Preprocess
from .sources import classifier_source, get_source, resolve_spec
from .specs import DEFAULT_MODEL, EMBEDDED_WEIGHTS
from .weights import embedded_weights_path, fit_state_dict, read_weights_file, state_dict_sha256

log = logging.getLogger(__name__)


@dataclass(repr=False)
class Backbone:
    """A frozen feature extractor: float images normalised per ``preprocess`` -> ``[B, num_features]``."""

    spec: str
    model: nn.Module
    num_features: int
    preprocess: Preprocess
    weights: str
    weights_sha256: str
    layer: str | None = None
    head: dict[str, Any] = field(default_factory=dict)  # where the classifier was: {"attr": ..., "in_features": ...}
    # An image-text model's text tower, as the identity records it (model/text.py: TextTower.record)
    text_tower: dict[str, Any] | None = None

    @property
    def identity(self) -> ModelIdentity:
        """What every output records about the backbone: its vectors are comparable with those of the same identity."""
        return ModelIdentity(self.spec, self.weights_sha256, self.layer, self.preprocess.to_dict(), self.weights,
                             self.text_tower)

    def describe(self) -> dict[str, Any]:
        """The identity, the weights' source, the dimension and the parameter count (``embedpipe models SPEC``)."""
        return {**self.identity.to_dict(), "weights": self.weights, "dim": self.num_features,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def __repr__(self) -> str:
        layer = f", layer {self.layer}" if self.layer else ""
        return (f"Backbone({self.spec}, dim {self.num_features}, {self.preprocess.input_size}px, "
                f"weights {self.weights}{layer})")


@dataclass(frozen=True, repr=False)
class Classifier:
    """A model with its classification head, weights loaded, in eval mode (not frozen: fine-tuning trains it)."""

    spec: str  # canonical: ``timm:efficientnet_lite0``
    model: nn.Module
    preprocess: Preprocess
    head: dict[str, Any]  # where the head is, when the source knows before removing it: {"attr", "in_features"}
    weights: str  # where the weights came from: default, none, a resolved path, embedded:<package>

    def __repr__(self) -> str:
        return f"Classifier({self.spec}, weights {self.weights})"


def load_backbone(spec: str = DEFAULT_MODEL, weights: str = "default", layer: str | None = None,
                  input_size: int | None = None, preprocess: Mapping[str, Any] | None = None) -> Backbone:
    """Build a frozen feature extractor from a model spec (the spec's source loads it).

    Args:
        spec: ``<source>:<name>`` (``timm:<name>``, ``torchvision:<name>``, ``torchscript:<path>``, ...), an
            alias, or a bare name (looked up in timm, then torchvision).
        weights: ``default`` (embedded or the library's download), ``none`` (random, seeded), or a file path.
        layer: optional graph node whose pooled output replaces the final features.
        input_size: optional crop size instead of the model's own.
        preprocess: optional preprocessing fields replacing the model's own (``--preprocess``, checked by
            ``preprocess.read_changes``), for a source that takes them (a TorchScript file); others refuse them.

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")
        >>> bb.num_features
        512
    """
    source, name = resolve_spec(spec)
    return get_source(source).load(name, weights, layer, input_size, preprocess)


def load_classifier(spec: str = DEFAULT_MODEL, weights: str = "default") -> Classifier:
    """The full model with its classification head, weights loaded; a UserError for a source without one."""
    source, name = resolve_spec(spec)
    return classifier_source(f"{source}:{name}", "loading a classifier").classifier(name, weights)


def classifier_with_weights(spec: str, weights: str,
                            create: Callable[[bool], tuple[nn.Module, Preprocess, dict[str, Any]]]) -> Classifier:
    """A classifier built by ``create(pretrained)`` with ``weights`` loaded: the library's download
    (``pretrained``: ``default`` without embedded weights), weights embedded in a package (their preprocessing
    overrides applied), a file, or random ones seeded alike in every process (``none``)."""
    embedded = embedded_weights_path(spec) if weights == "default" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every worker process
        model, pre, head = create(weights == "default" and embedded is None)
    source = weights
    if embedded is not None:
        model.load_state_dict(fit_state_dict(model, read_weights_file(embedded), str(embedded), spec, shipped=True))
        pre = Preprocess(**{**asdict(pre), **EMBEDDED_WEIGHTS[spec][1]})
        source = f"embedded:{EMBEDDED_WEIGHTS[spec][0]}"
    elif weights not in ("default", "none"):
        model.load_state_dict(fit_state_dict(model, read_weights_file(weights), weights, spec))
        source = str(Path(weights).resolve())
    return Classifier(spec, model.eval(), pre, head, source)


def features_of(clf: Classifier, layer: str | None, input_size: int | None,
                drop_head: Callable[[Classifier], tuple[nn.Module, dict[str, Any]]]) -> Backbone:
    """The frozen feature extractor of a classifier: its head dropped by the source's ``drop_head`` (or the pooled
    output of ``layer``), checked by one forward pass. The weights' sha256 is that of the whole classifier."""
    sha = state_dict_sha256(clf.model.state_dict())
    if layer:
        model, head = take_layer(clf.model, layer, clf.spec), clf.head
    else:
        model, head = drop_head(clf)
    model = freeze(model)
    dim = check_dim(model, clf.preprocess, None if layer else head.get("in_features"), clf.spec)
    return sized(Backbone(clf.spec, model, dim, clf.preprocess, clf.weights, sha, layer, head), input_size)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def sized(bb: Backbone, input_size: int | None) -> Backbone:
    """``bb`` fed ``input_size`` px crops when one is asked for (:func:`with_input_size`), else ``bb``."""
    return with_input_size(bb, input_size) if input_size else bb


def with_input_size(bb: Backbone, size: int) -> Backbone:
    """The same backbone fed ``size`` px crops (resize scaled to keep the crop ratio); checked by a forward pass."""
    pre = bb.preprocess
    new = Preprocess(size, int(round(size * pre.resize_size / pre.input_size)), pre.interpolation, pre.mean, pre.std)
    try:
        check_dim(bb.model, new, bb.num_features, bb.spec)
    except RuntimeError as e:
        raise UserError(f"{bb.spec} cannot take {size}px inputs ({e}); use its native size {pre.input_size}") from None
    return Backbone(bb.spec, bb.model, bb.num_features, new, bb.weights, bb.weights_sha256, bb.layer, bb.head,
                    bb.text_tower)


def check_dim(model: nn.Module, pre: Preprocess, expected: int | None, spec: str) -> int:
    """One forward pass on a blank image: the real feature dimension, checked against what the library says."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, pre.input_size, pre.input_size))
    if out.ndim != 2:
        raise UserError(f"{spec} returns shape {tuple(out.shape)}, expected [B, D] features; use --layer NODE")
    if expected is not None and out.shape[1] != expected:
        raise UserError(f"{spec}: features have dim {out.shape[1]} but the model declares {expected}")
    return int(out.shape[1])
