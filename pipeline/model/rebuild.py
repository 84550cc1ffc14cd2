"""The backbone that made some embeddings, rebuilt from their recorded metadata; new images embedded exactly alike."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from ..records import EmbeddingMeta, ModelIdentity
from .backbones import Backbone, load_backbone, with_input_size
from .compile import build_extractor
from .decoders.cpu import decode_one
from .device import resolve_device
from .image_header import DEFAULT_MAX_PIXELS, SkipSample
from .preprocess import Preprocess
from .sources import source_of
from .trust import check_code_file


def rebuild_backbone(meta: EmbeddingMeta) -> Backbone:
    """The backbone recorded in ``meta`` (model, weights, layer, input size; the whole preprocessing for a source
    that takes one by hand, as a TorchScript file embedded with ``--preprocess``), checked by its weights' sha256 (a
    TorchScript file before it is loaded: loading runs its code).

    Example:
        >>> bb = rebuild_backbone(store.read_metadata("emb/embeddings/shard-000000.parquet"))  # doctest: +SKIP
    """
    ident = meta.identity
    check_code_file(ident)  # a TorchScript file runs code as it loads: it must be the recorded one first
    given = dict(ident.preprocess) if ident.preprocess and source_of(ident.model).takes_preprocess else None
    bb = load_backbone(ident.model, ident.weights_arg(), ident.layer, preprocess=given)
    want = Preprocess.from_dict(ident.preprocess) if ident.preprocess else bb.preprocess
    if want.input_size != bb.preprocess.input_size:
        bb = with_input_size(bb, want.input_size)
    if ident.weights_sha256 and ident.weights_sha256 != bb.weights_sha256:
        raise UserError(f"the weights {ident.weights} of {ident.model} loaded here differ from those that made "
                        f"the embeddings (sha256 {bb.weights_sha256[:12]} vs {ident.weights_sha256[:12]}); pass the "
                        "same weights file")
    return bb


class ImageEmbedder:
    """The backbone recorded in ``meta``, built once, embedding encoded images exactly as the embed stage did.

    For callers that embed many queries (a service): decoding (:meth:`prepare`, with the decompression-bomb
    check of ``max_pixels``) is separate from the model call (:meth:`embed`), so bad images fail alone and
    good ones from several requests go through the model as one batch.

    Example:
        >>> emb = ImageEmbedder(open_index("idx").record.embedding_meta)  # doctest: +SKIP
        >>> emb.embed([emb.prepare(open("cat.jpg", "rb").read(), "cat.jpg")]).shape  # doctest: +SKIP
        (1, 1280)
    """

    def __init__(self, meta: EmbeddingMeta, device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS):
        bb = rebuild_backbone(meta)
        recorded = meta.identity.preprocess
        self.preprocess = Preprocess.from_dict(recorded) if recorded else bb.preprocess
        precision = meta.precision or "auto"
        if precision == "fp16" and resolve_device(device).type == "cpu":
            precision = "fp32"  # GPU-made fp16 embeddings, queried from a CPU: fp32 is the closest CPU can do
        # Query time: a micro-batch measurement (seconds) would be paid by the first query; never measured here.
        self.extractor = build_extractor(bb, device, precision, "eager", measure=False)
        self.normalize = meta.normalize
        self.max_pixels = max_pixels
        # What the vectors made here are comparable with.
        self.identity: ModelIdentity = replace(bb.identity, preprocess=self.preprocess.to_dict())

    def prepare(self, data: bytes, name: str) -> torch.Tensor:
        """Encoded image bytes -> the uint8 ``[3, S, S]`` model input; a bad or oversized image is a UserError."""
        try:
            return decode_one(data, self.preprocess, self.max_pixels)
        except SkipSample as e:
            raise UserError(f"cannot use image {name}: {e}") from None

    def embed(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Float32 ``[N, D]`` embeddings of prepared images, in one model call."""
        return self.extractor.embed(torch.stack(list(images)), self.normalize, "float32")


def embed_images(paths: Sequence[str], meta: EmbeddingMeta, device: str = "auto") -> tuple[np.ndarray, ModelIdentity]:
    """Embed image files exactly as the embed stage did for ``meta`` (an embedding shard's metadata).

    Returns the float32 ``[N, D]`` embeddings and the identity of the model used, so callers can refuse to
    compare embeddings of different models.
    """
    emb = ImageEmbedder(meta, device)
    return emb.embed([emb.prepare(Path(p).read_bytes(), p) for p in paths]), emb.identity
