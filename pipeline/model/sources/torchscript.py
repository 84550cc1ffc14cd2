"""The ``torchscript`` source: ``torchscript:<path>``, a TorchScript file that already returns features.

Loading one runs its code, so only an explicit ``torchscript:`` spec reaches this source (``bare_order`` None:
a bare name that happens to be a file is never loaded).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import UserError
from ..backbones import Backbone, Classifier, check_dim, freeze, sized
from ..deprecations import torchscript_calls
from ..preprocess import Preprocess
from ..text import TextTower
from . import text_refusal

log = logging.getLogger(__name__)
PREPROCESS_FILE = "preprocess.json"  # the extra file of the archive that says how its inputs must look


@dataclass(frozen=True)
class TorchScriptSource:
    """A traced or scripted feature extractor; preprocessing from its ``preprocess.json`` extra file, if any, with
    the fields given by hand (``--preprocess``) replaced."""

    name: str = "torchscript"
    argument: str = "<path>"
    about: str = "a TorchScript file returning [B, D] features (loading runs its code: trusted files only)"
    bare_order: int | None = None
    runs_code: bool = True
    has_classifier: bool = False
    takes_preprocess: bool = True
    has_text_tower: bool = False

    def names(self) -> frozenset[str]:
        return frozenset()  # names are paths

    def check(self, name: str) -> None:
        pass  # a path: loading says whether the file is there

    def load(self, name: str, weights: str = "default", layer: str | None = None,
             input_size: int | None = None, preprocess: Mapping[str, Any] | None = None) -> Backbone:
        p = Path(name)
        if layer:
            raise UserError("--layer cannot be used with torchscript: models (their graph is already fixed)")
        if not p.is_file():
            raise UserError(f"TorchScript file {p} does not exist")
        # The file holds its weights; a rebuild passes the recorded path back (and the sha256 checks it).
        if weights not in ("default", str(p.resolve())):
            raise UserError(f"--weights {weights} does not apply to torchscript: models (the file {p} holds its "
                            "weights); drop --weights")
        extra = {PREPROCESS_FILE: ""}
        try:
            with torchscript_calls():
                model = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise UserError(f"cannot load TorchScript file {p}: {e}") from None
        pre = _preprocess(p, extra[PREPROCESS_FILE], preprocess)
        model = freeze(model)
        try:
            dim = check_dim(model, pre, None, f"{self.name}:{p}")
        except RuntimeError as e:  # the file's fixed graph may take one input size only
            raise UserError(f"{p} fails on a {pre.input_size}px input ({str(e).strip().splitlines()[-1]}); give the "
                            "input_size it takes (--preprocess, --input-size)") from None
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        return sized(Backbone(f"{self.name}:{p.resolve()}", model, dim, pre, str(p.resolve()), sha), input_size)

    def classifier(self, name: str, weights: str = "default") -> Classifier:
        raise UserError(f"{self.name}:{name} has no classification head: TorchScript models give features only")

    def text_tower(self, name: str, weights: str = "default") -> TextTower:
        raise text_refusal(f"{self.name}:{name}", "a TorchScript file holds an image tower only; embed the images "
                           "with an image-text model, e.g. open_clip:ViT-B-32/openai, and index those embeddings")


def _preprocess(path: Path, recorded: str, given: Mapping[str, Any] | None) -> Preprocess:
    """The archive's own preprocessing, or ImageNet's defaults, said either way: a wrong one costs accuracy silently.
    Fields ``given`` by hand replace those (the caller says where they came from: the command line, a record)."""
    if recorded:
        try:
            pre = Preprocess.from_dict(json.loads(recorded))
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: its {PREPROCESS_FILE} is not a preprocessing record ({e}); write it as "
                            f"{json.dumps(Preprocess().to_dict())}") from None
        if given:
            log.debug("%s: its %s %s, with %s given", path, PREPROCESS_FILE, asdict(pre), dict(given))
            return pre.changed(given)
        log.info("%s: preprocessing from its %s: %s", path, PREPROCESS_FILE, asdict(pre))
        return pre
    pre = Preprocess()
    if given:
        log.debug("%s has no %s: ImageNet's defaults %s, with %s given", path, PREPROCESS_FILE, asdict(pre),
                  dict(given))
        return pre.changed(given)
    log.warning("%s has no %s extra file: using the ImageNet defaults %s; if the model was trained otherwise (CLIP, "
                "TF-ported weights), give its preprocessing with --preprocess '{...}', or save it in the file with "
                "torch.jit.save(m, path, _extra_files={%r: json.dumps({...})}) (README, model specs)", path,
                PREPROCESS_FILE, asdict(pre), PREPROCESS_FILE)
    return pre


SOURCE = TorchScriptSource()
