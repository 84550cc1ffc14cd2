"""The model-source registry: each module of this package is one source (``timm.py`` -> ``"timm"``), found by its name.

A source turns the name after its prefix in a model spec (``timm:resnet50``, ``torchscript:/models/feat.pt``)
into a frozen feature extractor, a :class:`~pipeline.model.backbones.Backbone`: the model with its head
replaced by Identity (or the pooled output of ``layer``), its preprocessing, its checked dimension and the
identity every output records. A source of classifiers (timm, torchvision) also loads the full model with its
head, and fine-tuning and exported classifiers put their head where that one was; a source without a head (a
TorchScript file of features, an image-text model) says so, and those callers refuse it before reading data. A
source of image-text models (open_clip) also loads the text tower that embeds text queries into the same space
(``model/text.py``); every other source refuses text queries with what to use instead.

Adding a source is one module defining ``SOURCE`` plus its tests; no list elsewhere names the sources. Listing
the names (:func:`source_names`) imports nothing; a source's module is imported on first use.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Protocol

from ...errors import UserError
from ...registry import Registry
from ..specs import ALIASES

# "Backbone", "Classifier" (model/backbones.py) and "TextTower" (model/text.py) below are named, not imported: those
# modules import this registry (load_backbone dispatches to a source), and torch comes with a source's module, not
# with the registry (option checks, --help).


class ModelSource(Protocol):
    """What every model source is: a spec prefix, how a spec names its models, and one loader."""

    name: str  # the spec prefix, which is the module's name
    argument: str  # what follows the prefix in a spec, for help and errors: "<name>" or "<path>"
    about: str  # one line for `embedpipe models`
    # Place in the lookup of bare names ("mobilenetv3_small_050": timm first, then torchvision); None: only with
    # its prefix (a TorchScript file runs code, so a bare name never loads one).
    bare_order: int | None
    # classifier() gives the full model with its classification head; fine-tuning and --export-classifier need one
    has_classifier: bool
    # load() takes a preprocessing given by hand (--preprocess): for models whose file may not record their own (a
    # TorchScript file); a library's model has its library's, so its source refuses one (preprocess_refused)
    takes_preprocess: bool
    # A name is a file whose loading runs its code (TorchScript), its weights_sha256 that file's sha256: a rebuild
    # checks the file against the record before loading it, and a service loads it only when trusted (trust.py).
    runs_code: bool
    # text_tower() gives the tower that embeds text into the image embeddings' space (search by text, zero-shot)
    has_text_tower: bool

    def names(self) -> frozenset[str]:
        """The model names a bare spec can mean (built once per process); empty when names are paths."""
        ...

    def check(self, name: str) -> None:
        """Refuse, before any download, a name the source does not have (a UserError with close names)."""
        ...

    def load(self, name: str, weights: str = "default", layer: str | None = None,
             input_size: int | None = None, preprocess: Mapping[str, Any] | None = None) -> "Backbone":
        """The frozen feature extractor for ``name``.

        ``weights``: ``default`` (embedded in a package, or the library's download), ``none`` (random, seeded:
        the same in every process) or a file path. ``layer``: a graph node whose pooled output replaces the
        features. ``input_size``: crops of that many pixels instead of the model's own (checked by a forward
        pass). ``preprocess``: fields of a preprocessing (``model/preprocess.read_changes``) replacing the model's
        own, only where ``takes_preprocess``. The result's ``model`` is in eval mode with no parameter requiring
        grad, its ``num_features`` is what one forward pass returned, and its ``identity`` is what every output
        records.
        """
        ...

    def classifier(self, name: str, weights: str = "default") -> "Classifier":
        """The full model with its classification head, weights loaded; only called when ``has_classifier``."""
        ...

    def text_tower(self, name: str, weights: str = "default") -> "TextTower":
        """The text tower of ``name`` with the same ``weights`` as its image tower; without ``has_text_tower``, a
        UserError at once (nothing loaded) that names the model and, where there is one, the spec to use instead."""
        ...


SOURCES: Registry[ModelSource] = Registry(__name__, "SOURCE", "model source")
source_names = SOURCES.names  # every source's name, the spec prefixes (none imported)
register = SOURCES.register  # a source kept outside this package (a plugin, a test), by its name

get_source = SOURCES.get  # the source called NAME (imported on first use); an unknown NAME lists the names


def all_sources() -> list[ModelSource]:
    """Every source (each module imported), those looked up by bare names first, in their order, then the others."""
    return sorted(SOURCES.all(), key=lambda s: (s.bare_order is None, s.bare_order or 0, s.name))


def resolve_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; aliases map first; bare names are looked up in the
    sources that take them, in their ``bare_order`` (timm, then torchvision).

    Example:
        >>> resolve_spec("default")
        ('timm', 'efficientnet_lite0')
    """
    spec = ALIASES.get(spec, spec)
    prefix, sep, name = spec.partition(":")
    if sep and prefix in source_names():
        if not name:
            raise UserError(f"model spec {spec!r} has no name after '{prefix}:'")
        get_source(prefix).check(name)
        return prefix, name
    sources = all_sources()
    bare = [s for s in sources if s.bare_order is not None]
    for source in bare:
        if spec in source.names():
            return source.name, spec
    hint = did_you_mean(spec, [*ALIASES, *(n for s in bare for n in s.names())], "")
    forms = [f"{s.name}:{s.argument}" for s in sources]
    raise UserError(
        f"unknown model {spec!r}: not a {' or '.join(s.name for s in bare)} model.{hint} "
        f"Specs look like {', '.join(forms[:-1])} or {forms[-1]}."
    )


def source_of(spec: str) -> ModelSource:
    """The source of a spec; a recorded (canonical, prefixed) spec is read without checking its name."""
    prefix, sep, _ = ALIASES.get(spec, spec).partition(":")
    return get_source(prefix if sep and prefix in source_names() else resolve_spec(spec)[0])


def preprocess_refused(spec: str) -> UserError:
    """The error for ``--preprocess`` with a model whose source has its own preprocessing."""
    able = [f"{s.name}:" for s in all_sources() if s.takes_preprocess]
    return UserError(f"--preprocess sets the preprocessing of a model file that may not record its own "
                     f"({', '.join(able)} models); {spec} takes its library's preprocessing, which every output "
                     "records: drop --preprocess (--input-size changes the crop size)")


def check_preprocess_option(spec: str) -> None:
    """Refuse ``--preprocess`` for ``spec`` before any work, unless its source takes one."""
    if not source_of(spec).takes_preprocess:
        raise preprocess_refused(spec)


def code_file(spec: str) -> str | None:
    """The file that loading the recorded ``spec`` would run as code (a source whose names are such files), else
    None. Imports only that source's module."""
    prefix, sep, name = ALIASES.get(spec, spec).partition(":")
    if sep and name and prefix in source_names() and get_source(prefix).runs_code:
        return name
    return None


def classifier_source(spec: str, what: str) -> ModelSource:
    """The source of ``spec`` when it has a classifier head for ``what`` to use or replace, else a UserError."""
    source = source_of(spec)
    if not source.has_classifier:
        able = [f"{s.name}:" for s in all_sources() if s.has_classifier]
        raise UserError(f"{what} needs a model with a classification head ({', '.join(able)} models); {spec} has "
                        f"none: {source.name}: models give features only")
    return source


def text_refusal(spec: str, instead: str = "") -> UserError:
    """The error for text queries (search by text, zero-shot classes) against vectors of ``spec``, a model with no
    text tower; ``instead`` says what to embed with (the default: an open_clip model)."""
    instead = instead or ("embed the images with an image-text model, e.g. open_clip:ViT-B-32/openai (pip install "
                          "'embedpipe[clip]'), and index those embeddings")
    return UserError(f"the model {spec} has no text tower, so text queries (search by text, zero-shot classes) "
                     f"cannot be embedded like its vectors; {instead}")


def did_you_mean(name: str, names: Iterable[str], prefix: str) -> str:
    """`` Did you mean a, b?`` with up to three close names (each after ``prefix``), or nothing."""
    near = difflib.get_close_matches(name, sorted(set(names)), n=3)
    return f" Did you mean {', '.join(prefix + n for n in near)}?" if near else ""
