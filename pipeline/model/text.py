"""Text towers: what an image-text model (CLIP) embeds text queries with, into the space of its image embeddings.

A source with a text tower (``has_text_tower``: ``open_clip``) builds a :class:`TextTower` from the same spec
and weights as its image :class:`~pipeline.model.backbones.Backbone`; the backbone's identity records the
tower (:attr:`TextTower.record`), so that a query typed months later is embedded with exactly that tower
(``model/rebuild.py``'s ``TextEmbedder`` checks it). Every other source refuses with what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..records import ModelIdentity
from .sources import get_source, resolve_spec, source_names, text_refusal


@dataclass(repr=False)
class TextTower:
    """A frozen text encoder: texts -> tokens (``tokenize``) -> ``[B, num_features]`` projected embeddings."""

    spec: str  # the canonical spec of the image-text model (the backbone's spec)
    model: nn.Module  # int64 tokens [B, context_length] -> float [B, num_features]; eval, no grad
    tokenize: Callable[[Sequence[str]], torch.Tensor]
    num_features: int
    weights_sha256: str  # of the text tower's own tensors
    tokenizer: str  # which tokenizer (and vocabulary): a query tokenized otherwise lands elsewhere
    context_length: int
    logit_scale: float = 100.0  # the learned temperature: cosine x this is what CLIP's softmax over classes takes

    @property
    def record(self) -> dict[str, Any]:
        """What the identity of the model's image embeddings records about this tower."""
        return {"model": self.spec, "weights_sha256": self.weights_sha256, "tokenizer": self.tokenizer,
                "context_length": self.context_length}

    def __repr__(self) -> str:
        return f"TextTower({self.spec}, dim {self.num_features}, {self.tokenizer}, context {self.context_length})"


def load_text_tower(spec: str, weights: str = "default") -> TextTower:
    """The text tower of an image-text model spec; a UserError that names the spec (and, where one exists, the
    spec to use instead) for a model without one.

    Example:
        >>> tower = load_text_tower("open_clip:ViT-B-32/openai")  # doctest: +SKIP
        >>> tower.num_features  # doctest: +SKIP
        512
    """
    source, name = resolve_spec(spec)
    return get_source(source).text_tower(name, weights)


def no_text_tower(spec: str) -> UserError:
    """The error for text queries against vectors of ``spec``: the source's own refusal (which says what to use
    instead), or, for a model no source knows (synthetic, foreign files), one that names it."""
    prefix, sep, name = spec.partition(":")
    if sep and prefix in source_names():
        source = get_source(prefix)
        refuse = getattr(source, "text_tower", None)  # a plugin source may predate text towers
        if refuse is not None and not getattr(source, "has_text_tower", False):
            try:
                refuse(name, "none")  # a source without a tower refuses at once, loading nothing
            except UserError as e:
                return e
    return text_refusal(spec)


def check_record(tower: TextTower, recorded: dict[str, Any], where: str) -> None:
    """Refuse a tower that differs from the one ``recorded`` with the vectors (field by field, both values)."""
    mine = tower.record
    diff = [k for k in ModelIdentity.TEXT_TOWER if recorded.get(k) is not None and recorded.get(k) != mine[k]]
    if diff:
        detail = "; ".join(f"{k}: recorded {recorded.get(k)!r}, loaded here {mine[k]!r}" for k in diff)
        raise UserError(f"the text tower loaded here for {where} differs from the one recorded with its vectors "
                        f"({detail}); install the same weights (and open_clip release) the index was built with")
