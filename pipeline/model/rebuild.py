"""The backbone that made some embeddings, rebuilt from their recorded metadata; new images embedded exactly alike."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import store
from ..errors import UserError
from .backbones import Backbone, load_backbone, with_input_size
from .compile import build_extractor
from .decode import SkipSample, decode_rgb
from .device import resolve_device
from .preprocess import Preprocess, resize_crop

# What an embedding shard's metadata must record for its backbone to be rebuilt.
REBUILD_KEYS = ("model", "weights", "weights_sha256", "preprocess")


def weights_arg(meta: dict[str, Any]) -> str:
    """The ``--weights`` value that loads the recorded ``weights`` source again (embedded weights: ``default``)."""
    w = meta.get("weights") or "default"
    return "default" if str(w).startswith("embedded:") else str(w)


def missing_keys(meta: dict[str, Any]) -> list[str]:
    """The :data:`REBUILD_KEYS` that ``meta`` lacks."""
    return [k for k in REBUILD_KEYS if not meta.get(k)]


def rebuild_backbone(meta: dict[str, Any]) -> Backbone:
    """The backbone recorded in ``meta`` (model, weights, layer, input size), checked by its weights' sha256.

    Example:
        >>> bb = rebuild_backbone(store.read_metadata("emb/embeddings/shard-000000.parquet"))  # doctest: +SKIP
    """
    if not meta.get("model"):
        raise UserError("the embeddings record no model (metadata key 'model'), so their backbone cannot be "
                        "rebuilt; embed with `embedpipe embed`")
    bb = load_backbone(meta["model"], weights_arg(meta), meta.get("layer"))
    want = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else bb.preprocess
    if want.input_size != bb.preprocess.input_size:
        bb = with_input_size(bb, want.input_size)
    if meta.get("weights_sha256") and meta["weights_sha256"] != bb.weights_sha256:
        raise UserError(f"the weights {meta.get('weights')} of {meta['model']} loaded here differ from those that made "
                        f"the embeddings (sha256 {bb.weights_sha256[:12]} vs {meta['weights_sha256'][:12]}); pass the "
                        "same weights file")
    return bb


def embed_images(paths: Sequence[str], meta: dict[str, Any], device: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Embed image files exactly as the embed stage did for ``meta`` (an embedding shard's metadata).

    Returns the float32 ``[N, D]`` embeddings and the model identity used (:data:`store.MODEL_KEYS`), so
    callers can refuse to compare embeddings of different models.
    """
    bb = rebuild_backbone(meta)
    want = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else bb.preprocess
    images = []
    for p in paths:
        try:
            images.append(resize_crop(decode_rgb(Path(p).read_bytes(), want.resize_size), want))
        except SkipSample as e:
            raise UserError(f"cannot use image {p}: {e}") from None
    precision = meta.get("precision", "auto")
    if precision == "fp16" and resolve_device(device).type == "cpu":
        precision = "fp32"  # GPU-made fp16 embeddings, queried from a CPU: fp32 is the closest CPU can do
    ex = build_extractor(bb, device, precision, "eager")
    vectors = ex.embed(torch.stack(images), bool(meta.get("normalize", True)), "float32")
    return vectors, store.model_identity({**bb.record(), "preprocess": want.to_dict()})
