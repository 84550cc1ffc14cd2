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
from .decoders.cpu import decode_one
from .device import resolve_device
from .image_header import DEFAULT_MAX_PIXELS, SkipSample
from .preprocess import Preprocess

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


class ImageEmbedder:
    """The backbone recorded in ``meta``, built once, embedding encoded images exactly as the embed stage did.

    For callers that embed many queries (a service): decoding (:meth:`prepare`, with the decompression-bomb
    check of ``max_pixels``) is separate from the model call (:meth:`embed`), so bad images fail alone and
    good ones from several requests go through the model as one batch.

    Example:
        >>> emb = ImageEmbedder(open_index("idx").meta["embedding_meta"])  # doctest: +SKIP
        >>> emb.embed([emb.prepare(open("cat.jpg", "rb").read(), "cat.jpg")]).shape  # doctest: +SKIP
        (1, 1280)
    """

    def __init__(self, meta: dict[str, Any], device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS):
        bb = rebuild_backbone(meta)
        self.preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else bb.preprocess
        precision = meta.get("precision", "auto")
        if precision == "fp16" and resolve_device(device).type == "cpu":
            precision = "fp32"  # GPU-made fp16 embeddings, queried from a CPU: fp32 is the closest CPU can do
        self.extractor = build_extractor(bb, device, precision, "eager")
        self.normalize = bool(meta.get("normalize", True))
        self.max_pixels = max_pixels
        # What the vectors made here are comparable with (store.MODEL_KEYS).
        self.identity = store.model_identity({**bb.record(), "preprocess": self.preprocess.to_dict()})

    def prepare(self, data: bytes, name: str) -> torch.Tensor:
        """Encoded image bytes -> the uint8 ``[3, S, S]`` model input; a bad or oversized image is a UserError."""
        try:
            return decode_one(data, self.preprocess, self.max_pixels)
        except SkipSample as e:
            raise UserError(f"cannot use image {name}: {e}") from None

    def embed(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Float32 ``[N, D]`` embeddings of prepared images, in one model call."""
        return self.extractor.embed(torch.stack(list(images)), self.normalize, "float32")


def embed_images(paths: Sequence[str], meta: dict[str, Any], device: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Embed image files exactly as the embed stage did for ``meta`` (an embedding shard's metadata).

    Returns the float32 ``[N, D]`` embeddings and the model identity used (:data:`store.MODEL_KEYS`), so
    callers can refuse to compare embeddings of different models.
    """
    emb = ImageEmbedder(meta, device)
    return emb.embed([emb.prepare(Path(p).read_bytes(), p) for p in paths]), emb.identity
