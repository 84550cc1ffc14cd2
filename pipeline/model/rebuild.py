"""The backbone that made some embeddings, rebuilt from their recorded metadata; new images (and, for an image-text
model, texts) embedded exactly alike."""
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
from .text import TextTower, check_record, load_text_tower, no_text_tower


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


def rebuild_text_tower(meta: EmbeddingMeta) -> TextTower:
    """The text tower recorded with ``meta``'s image embeddings (same weights, tokenizer and context length,
    checked); a UserError naming the model (and what to use instead) when it has none."""
    ident = meta.identity
    if ident.text_tower is None:
        raise no_text_tower(ident.model)
    tower = load_text_tower(ident.model, ident.weights_arg())
    check_record(tower, dict(ident.text_tower), f"the embeddings of {ident.model}")
    return tower


class TextEmbedder:
    """The text tower recorded in ``meta``, built once, embedding texts into the space of its image embeddings
    (normalised as they were). Built through :func:`rebuild_text_tower`, as :class:`ImageEmbedder` is through
    :func:`rebuild_backbone`, so a rule about which models may be loaded covers both.

    Example:
        >>> emb = TextEmbedder(open_index("idx").record.embedding_meta)  # doctest: +SKIP
        >>> emb.embed(["a red car"]).shape  # doctest: +SKIP
        (1, 512)
    """

    def __init__(self, meta: EmbeddingMeta, device: str = "auto"):
        tower = rebuild_text_tower(meta)
        self.device = resolve_device(device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(meta.precision or "fp32", torch.float32)
        if self.device.type == "cpu":
            dtype = torch.float32  # queries from a CPU: fp32, the closest it does to any precision
        self.model = tower.model.to(self.device, dtype)
        self.tokenize = tower.tokenize
        self.normalize = meta.normalize
        self.dim = tower.num_features
        self.logit_scale = tower.logit_scale
        self.identity: ModelIdentity = meta.identity  # what the vectors made here are comparable with

    def prepare(self, text: str) -> torch.Tensor:
        """A text -> its tokens ``[context_length]``; an empty text is a UserError (it has no meaning to search)."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("a text query must be a non-empty string")
        return self.tokenize([text])[0]

    @torch.inference_mode()
    def embed(self, tokens: Sequence[torch.Tensor]) -> np.ndarray:
        """Float32 ``[N, D]`` embeddings of prepared texts, in one model call."""
        x = self.model(torch.stack(list(tokens)).to(self.device)).float()
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        return x.cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 ``[N, D]`` embeddings (tokenized, then one model call)."""
        return self.embed([self.prepare(t) for t in texts])
