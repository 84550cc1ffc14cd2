"""What the sources of classifier libraries (timm, torchvision) share: the loader that builds the classifier with
its weights, then drops its head. Each such source says how to create a model, how to drop its head, and which
names it has. (A module starting with ``_`` is no source of the registry.)"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from torch import nn

from ..backbones import Backbone, Classifier, classifier_with_weights, features_of
from ..preprocess import Preprocess
from ..text import TextTower
from . import preprocess_refused, text_refusal


class ClassifierLibrary:
    """The ``load``/``classifier`` half of :class:`~pipeline.model.sources.ModelSource` for a library of classifiers;
    a subclass (a frozen dataclass with the source's fields) defines ``check``, ``create`` and ``drop_head``."""

    name: str
    takes_preprocess: ClassVar[bool] = False  # the library's own, recorded in every output

    def check(self, name: str) -> None:
        raise NotImplementedError

    def create(self, name: str, pretrained: bool) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
        """The library's model, with its download of weights when ``pretrained``: (model, preprocess, head)."""
        raise NotImplementedError

    def drop_head(self, clf: Classifier) -> tuple[nn.Module, dict[str, Any]]:
        """The feature model of ``clf`` (its head replaced by Identity) and where the head was."""
        raise NotImplementedError

    def load(self, name: str, weights: str = "default", layer: str | None = None,
             input_size: int | None = None, preprocess: Mapping[str, Any] | None = None) -> Backbone:
        if preprocess:
            raise preprocess_refused(f"{self.name}:{name}")
        return features_of(self.classifier(name, weights), layer, input_size, self.drop_head)

    def classifier(self, name: str, weights: str = "default") -> Classifier:
        self.check(name)
        return classifier_with_weights(f"{self.name}:{name}", weights, lambda pretrained: self.create(name, pretrained))

    def text_tower(self, name: str, weights: str = "default") -> TextTower:
        raise text_refusal(f"{self.name}:{name}")  # image classifiers have no text tower
