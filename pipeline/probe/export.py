"""A trained probe (or fine-tuned model) as one TorchScript classifier of raw uint8 images, preprocessing baked in."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .. import atomic, store
from ..errors import UserError
from ..model.backbones import Backbone
from ..model.deprecations import torchscript_calls
from ..model.preprocess import Preprocess, UInt8Normalize
from ..model.rebuild import rebuild_backbone
from ..model.sources import classifier_source, source_of
from ..records import EmbeddingMeta

log = logging.getLogger(__name__)


class FeatureHead(nn.Module):
    """What the probe saw, then the probe: optional L2 normalisation, optional float16 rounding, Linear."""

    def __init__(self, linear: nn.Linear, normalize: bool, fp16_round: bool):
        super().__init__()
        self.normalize = normalize
        self.fp16_round = fp16_round
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        if self.fp16_round:
            x = x.half().float()  # the embeddings were stored as float16
        return self.linear(x)


class Normalized(nn.Module):
    """uint8 crops -> the one normaliser -> the network (with its classifier replaced by the probe)."""

    def __init__(self, model: nn.Module, pre: Preprocess):
        super().__init__()
        self.normalize = UInt8Normalize(pre.mean, pre.std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class RawImageClassifier(nn.Module):
    """uint8 RGB images ``[B,3,H,W]`` (or one ``[3,H,W]``) of any size -> logits ``[B, C]``.

    Resizes the shorter side to ``resize_size`` (antialiased) and centre-crops ``input_size``, exactly as
    ``embedpipe embed`` does, then runs the traced network. ``classes`` holds the class names.
    """

    def __init__(self, net: torch.jit.ScriptModule, pre: Preprocess, classes: List[str]):
        super().__init__()
        self.net = net
        self.resize_size = pre.resize_size
        self.input_size = pre.input_size
        self.bicubic = pre.interpolation == "bicubic"
        self.classes = classes

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images if images.dim() == 4 else images.unsqueeze(0)
        if x.dtype != torch.uint8:
            raise ValueError("expected uint8 RGB images [B,3,H,W] (e.g. torchvision.io.decode_image)")
        mode = InterpolationMode.BICUBIC if self.bicubic else InterpolationMode.BILINEAR
        x = TF.resize(x, [self.resize_size], interpolation=mode, antialias=True)
        return TF.center_crop(x, [self.input_size, self.input_size])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    @torch.jit.export
    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(class ids, probability of that class)``."""
        p = torch.softmax(self.forward(images), dim=1)
        prob, cls = p.max(dim=1)
        return cls, prob

    @torch.jit.export
    def forward_list(self, images: List[torch.Tensor]) -> torch.Tensor:
        """Logits for a list of images of different sizes."""
        return self.net(torch.cat([self.preprocess(im) for im in images], dim=0))


def check_exportable(emb_dir: str | Path) -> EmbeddingMeta:
    """Fail before training when the embeddings do not say which backbone made them."""
    meta = store.shard_info(store.list_shards(emb_dir)[0]).metadata
    missing = meta.identity.missing_for_rebuild() if meta else ["model"]
    if meta is None or missing:
        raise UserError(f"{emb_dir}: embedding metadata lacks {', '.join(missing)}, so the backbone cannot be "
                        "rebuilt for --export-classifier; embed with `embedpipe embed`")
    # The probe's head goes where the classifier was; an image-text model's embedding is its output (what its
    # zero-shot head was made for), so the head goes after it.
    if not getattr(source_of(meta.model), "has_text_tower", False):
        classifier_source(meta.model, "--export-classifier")
    return meta


def attach_head(bb: Backbone, head: nn.Module) -> nn.Module:
    """Put ``head`` where the backbone's classifier was (``model.fc = ...``), else after the features."""
    attr = bb.head.get("attr") if not bb.layer else None
    if attr:
        parent_path, _, name = attr.rpartition(".")
        parent = bb.model.get_submodule(parent_path) if parent_path else bb.model
        if isinstance(getattr(parent, name, None), nn.Identity):
            setattr(parent, name, head)
            return bb.model
    return nn.Sequential(bb.model, head)


def build_classifier(model: nn.Module, pre: Preprocess, classes: List[str]) -> torch.jit.ScriptModule:
    """Trace the network at its input size, script the resize/crop wrapper around it."""
    net = Normalized(model, pre).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    example = torch.randint(0, 256, (2, 3, pre.input_size, pre.input_size), dtype=torch.uint8)
    with torch.no_grad(), torchscript_calls():  # TorchScript is the exported contract
        traced = torch.jit.trace(net, example, check_trace=False)
        return torch.jit.script(RawImageClassifier(traced, pre, classes).eval())


def save_scripted(module: torch.jit.ScriptModule, path: str | Path, info: dict[str, Any]) -> None:
    """Atomic save; ``info`` (classes, preprocessing, provenance) travels as the extra file ``embedpipe.json``."""
    buf = io.BytesIO()
    with torchscript_calls():
        torch.jit.save(module, buf, _extra_files={"embedpipe.json": json.dumps(info, sort_keys=True, default=str)})
    atomic.write_bytes(Path(path), buf.getvalue())


def export_classifier(probe_dir: str | Path, path: str | Path) -> Path:
    """Backbone of the embedding run + the probe's head -> TorchScript file of a raw-image classifier.

    Example:
        >>> export_classifier("runs/digits-probe", "digits.pt")  # doctest: +SKIP
        >>> m = torch.jit.load("digits.pt"); cls, prob = m.predict(torchvision.io.decode_image("3.jpg"))  # doctest: +SKIP
    """
    from .head import load_head

    head = load_head(probe_dir)
    spec = head.feature_spec
    missing = spec.identity.missing_for_rebuild() if spec else ["model"]
    if spec is None or missing:
        raise UserError(f"{probe_dir}: the probe's feature spec lacks {', '.join(missing)}; retrain it on embeddings "
                        "made by `embedpipe embed`")
    bb = rebuild_backbone(spec)
    pre = Preprocess.from_dict(spec.identity.preprocess)
    fh = FeatureHead(head.linear(), spec.normalize, spec.dtype == "float16")
    model = attach_head(bb, fh)
    module = build_classifier(model, pre, head.class_names)
    info = {"kind": "probe", "classes": head.class_names, "preprocess": pre.to_dict(), "feature_spec": spec.to_dict(),
            "input": "uint8 RGB [B,3,H,W] or [3,H,W]; output logits [B,C]; .predict() -> (class ids, probs)"}
    save_scripted(module, path, info)
    log.info("exported %s classifier (%d classes) to %s", spec.model, len(head.class_names), path)
    return Path(path)
