"""The typed records stages hand each other: what identifies a model's vectors, and an embedding shard's metadata.

Each record is a frozen dataclass with one ``from_dict`` that refuses unknown and missing fields (the error names
them and the file) and still reads what older versions wrote (fields they lacked have defaults), and one
``to_dict`` that writes the same flat JSON the files have always held, so older releases read new files too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TypeVar

from .errors import UserError

R = TypeVar("R")


def strict_fields(cls: type[R], d: Mapping[str, Any], where: str,
                  fields: Sequence[dataclasses.Field] | None = None) -> dict:
    """``d``'s values for the fields of dataclass ``cls`` (or for ``fields``, when the file spells the record
    otherwise): unknown keys and missing required ones are a UserError naming them and ``where``."""
    if not isinstance(d, Mapping):
        raise UserError(f"{where}: expected a JSON object, found {type(d).__name__}; the file is damaged: rewrite it")
    known = {f.name: f for f in (fields if fields is not None else dataclasses.fields(cls))}  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)} in the {cls.__name__} record; it was written "
                        "by a newer embedpipe or edited by hand: upgrade embedpipe, or rewrite the file")
    missing = sorted(n for n, f in known.items() if n not in d and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise UserError(f"{where}: the {cls.__name__} record lacks {', '.join(missing)}; the file is incomplete: "
                        "rewrite it with embedpipe")
    return dict(d)


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two vectors comparable: the same network, weights, layer and preprocessing.

    ``weights`` says where the weights came from (``none``, ``embedded:<package>``, a path); it is not part of
    the identity (the same weights under two paths are the same model) but is what rebuilding needs.
    ``text_tower`` (image-text models only: ``{"model", "weights_sha256", "tokenizer", "context_length"}``) is the
    tower that embeds text queries into the same space, so that a query is embedded later with exactly that
    tower; it is written only when there is one (files of image-only models stay as every release wrote them).

    Example:
        >>> a = ModelIdentity("timm:resnet18", "ab12", None, {"input_size": 64})
        >>> a.differences(ModelIdentity("timm:resnet18", "cd34", None, {"input_size": 64}))
        ['weights_sha256']
    """

    model: str
    weights_sha256: str | None = None
    layer: str | None = None
    preprocess: Mapping[str, Any] | None = None
    weights: str | None = field(default=None, compare=False)
    text_tower: Mapping[str, Any] | None = None

    # The fields compared; a side that records None for one (older or foreign files) is not held against it.
    COMPARED = ("model", "weights_sha256", "layer", "preprocess")
    REBUILD = ("model", "weights", "weights_sha256", "preprocess")  # what rebuilding the backbone needs
    # Text-tower record fields that must match when a text query is embedded for these vectors.
    TEXT_TOWER = ("model", "weights_sha256", "tokenizer", "context_length")

    def to_dict(self) -> dict[str, Any]:
        """The identity fields as embedding metadata, run fingerprints and probe heads record them (the text
        tower's record only when there is one: the whole weights' sha256 already tells two such models apart)."""
        out = {k: _plain(getattr(self, k)) for k in self.COMPARED}
        if self.text_tower is not None:
            out["text_tower"] = _plain(self.text_tower)
        return out

    def differences(self, other: "ModelIdentity") -> list[str]:
        """The compared fields both sides record that differ."""
        return [k for k in self.COMPARED
                if getattr(self, k) is not None and getattr(other, k) is not None
                and _plain(getattr(self, k)) != _plain(getattr(other, k))]

    def check_same(self, other: "ModelIdentity", where: str, fix: str, theirs: str = "the index") -> None:
        """Refuse vectors of another model; the error names each differing field and both values."""
        diff = self.differences(other)
        if diff:
            short = theirs.removeprefix("the ")
            detail = "; ".join(f"{k}: {short} has {_plain(getattr(self, k))!r}, {where} has "
                               f"{_plain(getattr(other, k))!r}" for k in diff)
            raise UserError(f"{where} was embedded with another model than {theirs} ({detail}); {fix}")

    def missing_for_rebuild(self) -> list[str]:
        """The :data:`REBUILD` fields this identity lacks (the backbone cannot be rebuilt without them)."""
        return [k for k in self.REBUILD if not getattr(self, k)]

    def weights_arg(self) -> str:
        """The ``--weights`` value that loads the recorded weights again (embedded weights: ``default``)."""
        w = self.weights or "default"
        return "default" if w.startswith("embedded:") else w

    def key(self) -> str:
        """A stable string of the compared fields and the weights' source (a cache key for built models)."""
        return json.dumps({**self.to_dict(), "weights": self.weights}, sort_keys=True)


@dataclass(frozen=True)
class EmbeddingMeta:
    """The metadata of every embedding shard (Parquet file metadata under ``store.META_KEY``): the model identity
    and how the vectors were made."""

    identity: ModelIdentity
    dim: int
    dtype: str
    precision: str | None = None  # fp32 / fp16 / bf16 as run
    compile: str | None = None
    normalize: bool = True
    version: str | None = None  # the embedpipe that wrote the shard

    @property
    def model(self) -> str:
        return self.identity.model

    def rebuild_key(self) -> str:
        """What a backbone rebuilt to embed queries like these vectors depends on (a cache key for built models)."""
        return json.dumps({"identity": self.identity.key(), "precision": self.precision,
                           "normalize": self.normalize}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object the files hold (identity fields beside the others, as every release wrote it)."""
        return {**self.identity.to_dict(), "weights": self.identity.weights, "dim": self.dim, "dtype": self.dtype,
                "precision": self.precision, "compile": self.compile, "normalize": self.normalize,
                "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "embedding metadata") -> "EmbeddingMeta":
        """Read the flat object; strict about field names, lenient where older versions recorded less."""
        identity = dataclasses.fields(ModelIdentity)
        # the files hold the identity's fields beside the others (flat), as every release wrote them
        flat = strict_fields(cls, d, where, [*identity, *(f for f in dataclasses.fields(cls) if f.name != "identity")])
        ident = {f.name: flat.pop(f.name) for f in identity if f.name in flat}
        if not isinstance(ident.get("model"), str) or not ident["model"]:
            raise UserError(f"{where}: 'model' must name the model that made the embeddings, found "
                            f"{ident.get('model')!r}; rewrite the file with embedpipe")
        return cls(ModelIdentity(**ident), **flat)


def _plain(value: Any) -> Any:
    """Tuples as lists (JSON has no tuples), so a value read back from a file equals the one written."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
