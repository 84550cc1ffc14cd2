"""Model specs -> frozen feature extractors: the classifier, head removal or a pooled layer, freezing, the dim check."""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..records import ModelIdentity
from .deprecations import torchscript_calls
from .preprocess import Preprocess
from .specs import DEFAULT_MODEL, EMBEDDED_WEIGHTS, resolve_spec
from .weights import (
    check_online,
    embedded_weights_path,
    fit_state_dict,
    read_weights_file,
    state_dict_sha256,
)

log = logging.getLogger(__name__)

HEAD_ATTRS = ("fc", "classifier", "heads", "head")


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

    @property
    def identity(self) -> ModelIdentity:
        """What every output records about the backbone: its vectors are comparable with those of the same identity."""
        return ModelIdentity(self.spec, self.weights_sha256, self.layer, self.preprocess.to_dict(), self.weights)

    def describe(self) -> dict[str, Any]:
        """The identity, the weights' source, the dimension and the parameter count (``embedpipe models SPEC``)."""
        return {**self.identity.to_dict(), "weights": self.weights, "dim": self.num_features,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def __repr__(self) -> str:
        layer = f", layer {self.layer}" if self.layer else ""
        return (f"Backbone({self.spec}, dim {self.num_features}, {self.preprocess.input_size}px, "
                f"weights {self.weights}{layer})")


def _timm_model(name: str, weights: str, spec: str) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    import timm
    from timm.data import resolve_data_config

    if weights == "default" and embedded_weights_path(spec) is None:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
        cached = hub_id and (Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub" /
                             f"models--{hub_id.replace('/', '--')}").is_dir()
        if not cached:
            check_online("huggingface.co", f"timm weights for {name}")
        model = timm.create_model(name, pretrained=True)
    else:
        model = timm.create_model(name, pretrained=False)
    dc = resolve_data_config({}, model=model)
    size = dc["input_size"][-1]
    pre = Preprocess(size, int(round(size / dc.get("crop_pct", 0.875))), dc.get("interpolation", "bicubic"),
                     tuple(dc["mean"]), tuple(dc["std"]))
    # head_hidden_size: models with a pre-logits layer after pooling (MobileNetV3: 960 -> 1280) feed that to the head
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    head = {"attr": model.pretrained_cfg.get("classifier", "classifier"), "in_features": dim}
    return model, pre, head


def _torchvision_model(name: str, weights: str) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"torchvision:{name} is not a torchvision classification model")
    pre = Preprocess()
    try:
        w = torchvision.models.get_model_weights(name).DEFAULT
        t = w.transforms()
        pre = Preprocess(t.crop_size[0], t.resize_size[0], t.interpolation.value, tuple(t.mean), tuple(t.std))
    except Exception:  # models without registered weights keep ImageNet defaults
        w = None
    if weights == "default":
        if w is None:
            raise UserError(f"torchvision:{name} has no default weights; pass --weights PATH or none")
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        if not cached.is_file():
            check_online("download.pytorch.org", f"torchvision weights for {name}")
        model = torchvision.models.get_model(name, weights=w)
    else:
        model = torchvision.models.get_model(name, weights=None)
    return model, pre, {}


def remove_head(model: nn.Module, spec: str) -> tuple[nn.Module, dict[str, Any]]:
    """Replace the last Linear of the classification head (fc / classifier / heads / head) with Identity."""
    for attr in HEAD_ATTRS:
        head = getattr(model, attr, None)
        if not isinstance(head, nn.Module):
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, {"attr": attr, "in_features": head.in_features}
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            path, last = linears[-1]
            parent = head.get_submodule(path.rpartition(".")[0]) if "." in path else head
            setattr(parent, path.rpartition(".")[2], nn.Identity())
            return model, {"attr": f"{attr}.{path}", "in_features": last.in_features}
    raise UserError(f"{spec}: cannot find a Linear classification head (fc/classifier/heads/head); use --layer NODE")


class PooledNode(nn.Module):
    """Output of one named graph node, globally average-pooled to ``[B, C]``."""

    def __init__(self, extractor: nn.Module, node: str):
        super().__init__()
        self.extractor = extractor
        self.node = node

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.extractor(x)[self.node]
        if y.ndim == 4:
            return y.mean(dim=(2, 3))
        if y.ndim == 3:  # transformer tokens [B, N, C]
            return y.mean(dim=1)
        return y.flatten(1)


def take_layer(model: nn.Module, layer: str, spec: str) -> nn.Module:
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    _, nodes = get_graph_node_names(model)
    # A module name ("layer3") stands for its last node, as in torchvision's own feature extraction.
    if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
        near = difflib.get_close_matches(layer, nodes, n=5, cutoff=0.3)
        raise UserError(f"{spec} has no node {layer!r}; close names: {', '.join(near) or 'none'} "
                        f"(`embedpipe models {spec} --nodes` lists all {len(nodes)})")
    return PooledNode(create_feature_extractor(model, return_nodes=[layer]), layer)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_backbone(spec: str = DEFAULT_MODEL, weights: str = "default", layer: str | None = None) -> Backbone:
    """Build a frozen feature extractor from a model spec.

    Args:
        spec: ``timm:<name>``, ``torchvision:<name>``, ``torchscript:<path>``, an alias, or a bare name.
        weights: ``default`` (embedded or the library's download), ``none`` (random, seeded), or a file path.
        layer: optional graph node whose pooled output replaces the final features.

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")
        >>> bb.num_features
        512
    """
    kind, name = resolve_spec(spec)
    if kind == "torchscript":
        return _load_torchscript(name, layer)
    canonical, model, pre, head, source = load_classifier(spec, weights)
    sha = state_dict_sha256(model.state_dict())
    if layer:
        model = take_layer(model, layer, canonical)
    elif kind == "timm":
        model.reset_classifier(0)
    else:
        model, head = remove_head(model, canonical)
    model = freeze(model)
    dim = check_dim(model, pre, head.get("in_features") if not layer else None, canonical)
    return Backbone(canonical, model, dim, pre, source, sha, layer, head)


def with_input_size(bb: Backbone, size: int) -> Backbone:
    """The same backbone fed ``size`` px crops (resize scaled to keep the crop ratio); checked by a forward pass."""
    pre = bb.preprocess
    new = Preprocess(size, int(round(size * pre.resize_size / pre.input_size)), pre.interpolation, pre.mean, pre.std)
    try:
        check_dim(bb.model, new, bb.num_features, bb.spec)
    except RuntimeError as e:
        raise UserError(f"{bb.spec} cannot take {size}px inputs ({e}); use its native size {pre.input_size}") from None
    return Backbone(bb.spec, bb.model, bb.num_features, new, bb.weights, bb.weights_sha256, bb.layer, bb.head)


def load_classifier(spec: str = DEFAULT_MODEL, weights: str = "default") -> tuple[str, nn.Module, Preprocess, dict, str]:
    """The full model with its classification head, weights loaded: ``(spec, model, preprocess, head, source)``."""
    kind, name = resolve_spec(spec)
    canonical = f"{kind}:{name}"
    if kind == "torchscript":
        raise UserError("torchscript: models are feature extractors already; they have no classifier to load")
    embedded = embedded_weights_path(canonical) if weights == "default" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every worker process
        if kind == "timm":
            model, pre, head = _timm_model(name, weights, canonical)
        else:
            model, pre, head = _torchvision_model(name, weights)
    source = weights
    if embedded is not None:
        model.load_state_dict(fit_state_dict(model, read_weights_file(embedded), str(embedded), canonical))
        pre = Preprocess(**{**asdict(pre), **EMBEDDED_WEIGHTS[canonical][1]})
        source = f"embedded:{EMBEDDED_WEIGHTS[canonical][0]}"
    elif weights not in ("default", "none"):
        model.load_state_dict(fit_state_dict(model, read_weights_file(weights), weights, canonical))
        source = str(Path(weights).resolve())
    return canonical, model.eval(), pre, head, source


def check_dim(model: nn.Module, pre: Preprocess, expected: int | None, spec: str) -> int:
    """One forward pass on a blank image: the real feature dimension, checked against what the library says."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, pre.input_size, pre.input_size))
    if out.ndim != 2:
        raise UserError(f"{spec} returns shape {tuple(out.shape)}, expected [B, D] features; use --layer NODE")
    if expected is not None and out.shape[1] != expected:
        raise UserError(f"{spec}: features have dim {out.shape[1]} but the model declares {expected}")
    return int(out.shape[1])


def _load_torchscript(path: str, layer: str | None) -> Backbone:
    """A TorchScript file that already returns features. Loading it runs code: only explicit specs get here."""
    p = Path(path)
    if layer:
        raise UserError("--layer cannot be used with torchscript: models (their graph is already fixed)")
    if not p.is_file():
        raise UserError(f"TorchScript file {p} does not exist")
    extra = {"preprocess.json": ""}
    try:
        with torchscript_calls():
            model = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise UserError(f"cannot load TorchScript file {p}: {e}") from None
    pre = Preprocess.from_dict(json.loads(extra["preprocess.json"])) if extra["preprocess.json"] else Preprocess()
    model = freeze(model)
    dim = check_dim(model, pre, None, f"torchscript:{p}")
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return Backbone(f"torchscript:{p.resolve()}", model, dim, pre, str(p.resolve()), sha)
