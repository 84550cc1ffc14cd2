"""The ``open_clip`` source: ``open_clip:<arch>[/<pretrained>]``, CLIP models with an image and a text tower.

The image tower gives the projected CLIP embedding (what ``encode_image`` returns; the embed stage normalises
it), with the model's own preprocessing; the text tower (:meth:`OpenClipSource.text_tower`) embeds text queries
into the same space, and the image backbone's identity records it. Weights: a pretrained tag in the spec
(``open_clip:ViT-B-32/laion2b_s34b_b79k``; open_clip downloads it or finds it in its cache), a checkpoint file
(``--weights FILE``) or ``none`` (random, seeded). Architecture configs beyond open_clip's own are added with
``EMBEDPIPE_OPEN_CLIP_CONFIGS`` (files or folders of open_clip model-config JSON, ``os.pathsep``-separated).
Needs the ``clip`` extra (``open_clip_torch``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ...errors import UserError
from ..backbones import Backbone, Classifier, check_dim, freeze, sized
from ..preprocess import Preprocess
from ..text import TextTower
from ..weights import check_online, state_dict_sha256
from . import did_you_mean, preprocess_refused

log = logging.getLogger(__name__)
CONFIGS_ENV = "EMBEDPIPE_OPEN_CLIP_CONFIGS"
INTERPOLATIONS = ("bicubic", "bilinear")  # what model/preprocess.resize_crop does
NOT_TEXT = ("logit_scale", "logit_bias")  # tensors of the whole model that belong to neither tower


@functools.lru_cache(maxsize=None)
def _library() -> Any:
    """open_clip, with the configs of ``EMBEDPIPE_OPEN_CLIP_CONFIGS`` added (once per process)."""
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip: models need the open_clip_torch package: pip install 'embedpipe[clip]'") from None
    for path in filter(None, os.environ.get(CONFIGS_ENV, "").split(os.pathsep)):
        if not Path(path).exists():
            raise UserError(f"{CONFIGS_ENV} names {path}, which does not exist; give open_clip model-config JSON "
                            "files or folders of them")
        open_clip.add_model_config(path)
    return open_clip


@functools.lru_cache(maxsize=None)
def model_names() -> frozenset[str]:
    """open_clip's architectures (its configs and ``EMBEDPIPE_OPEN_CLIP_CONFIGS``'), built once per process."""
    return frozenset(_library().list_models())


def split(name: str) -> tuple[str, str | None]:
    """``"ViT-B-32/openai"`` -> ``("ViT-B-32", "openai")``; ``"ViT-B-32"`` -> ``("ViT-B-32", None)``."""
    arch, _, tag = name.partition("/")
    return arch, tag or None


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """open_clip logs on the root logger ("initialized randomly", its config choices): embedpipe says what matters."""
    def drop(record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _cached_tag_file(arch: str, tag: str, cfg: dict[str, Any]) -> tuple[str | None, str, str]:
    """(the tag's checkpoint in the local cache or None, the cache path it would be at, the download host)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/repo/" names the repo's default checkpoint
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for n in names:
            found = try_to_load_from_cache(repo, n)
            if isinstance(found, str):
                return found, found, "huggingface.co"
        return None, str(Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"), "huggingface.co"
    url = cfg.get("url", "")
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return (str(path) if path.is_file() else None), str(path), url.split("/")[2] if "//" in url else url


def _tag_checkpoint(arch: str, tag: str) -> str:
    """The checkpoint of a pretrained tag: from open_clip's cache, else downloaded; offline, a clear error."""
    lib = _library()
    cfg = lib.get_pretrained_cfg(arch, tag)
    if "file" in cfg:
        return cfg["file"]
    found, where, host = _cached_tag_file(arch, tag, cfg)
    if found:
        return found
    try:
        check_online(host, f"the open_clip weights {arch}/{tag} (not in the cache {where})")
    except UserError as e:
        raise UserError(f"{e} Or, on a machine online, run `python -c \"import open_clip; open_clip."
                        f"create_model('{arch}', pretrained='{tag}')\"` and copy {where} here") from None
    try:
        return lib.download_pretrained(cfg)
    except Exception as e:  # a failed download is the user's network or disk, said with the tag
        raise UserError(f"cannot download the open_clip weights {arch}/{tag} into {where}: {e}") from None


def _tokenizer_name(arch: str) -> str:
    """Which tokenizer open_clip's ``get_tokenizer`` gives ``arch``, from its config (nothing downloaded)."""
    text_cfg = (_library().get_model_config(arch) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        return f"hf:{text_cfg['hf_tokenizer_name']}"
    if "siglip" in arch.lower():
        return f"siglip:{arch}"
    return "open_clip:bpe_simple_vocab_16e6"


@dataclass
class _Clip:
    """A CLIP model with its weights, and what the source records about them."""

    model: nn.Module
    preprocess: Preprocess
    weights: str  # default (the tag), none, a resolved path
    sha256: str  # of every tensor of the model: both towers


class _EncodeText(nn.Module):
    """Tokens -> the projected text embedding (``encode_text``); the image tower dropped.

    A CLIP text tower with a causal mask pooled at the end token (``argmax``: the highest id) computes the same
    embedding from the tokens up to the longest text's end as from all ``context_length`` of them: no position
    attends to a later one. A query of a few words then costs a few positions' compute instead of 77.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        clip.visual = nn.Identity()
        self.clip = clip
        self.trim = (getattr(clip, "text_pool_type", None) == "argmax" and getattr(clip, "attn_mask", None) is not None
                     and all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "ln_final")))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.trim:
            return self.clip.encode_text(tokens)
        c = self.clip
        n = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :n]
        cast = c.transformer.get_cast_dtype()
        x = c.token_embedding(tokens).to(cast) + c.positional_embedding[:n].to(cast)
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if c.text_projection is None:
            return x
        return c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection


@dataclass(frozen=True)
class OpenClipSource:
    """open_clip's image-text models; weights from a pretrained tag, a checkpoint file, or none."""

    name: str = "open_clip"
    argument: str = "<arch>[/<pretrained>]"
    about: str = "open_clip's CLIP models, image and text towers (`open_clip.list_pretrained()`; extra: clip)"
    bare_order: int | None = None  # only with its prefix: its names (ViT-B-32) say nothing of the library
    has_classifier: bool = False
    has_text_tower: bool = True
    takes_preprocess: bool = False  # the model's own (or its tag's), recorded in every output
    runs_code: bool = False  # a checkpoint is tensors, loaded by the installed library's code

    names = staticmethod(model_names)

    def check(self, name: str) -> None:
        arch, tag = split(name)
        if arch not in model_names():
            raise UserError(f"open_clip has no architecture {arch!r}.{did_you_mean(arch, model_names(), 'open_clip:')}"
                            f" `open_clip.list_models()` lists them ({CONFIGS_ENV} adds config files)")
        tags = _library().list_pretrained_tags_by_model(arch)
        if tag is not None and tag not in tags:
            raise UserError(f"open_clip has no pretrained tag {tag!r} for {arch}; its tags: "
                            f"{', '.join(tags) or 'none (pass --weights FILE or none)'}")

    def _create(self, name: str, weights: str) -> _Clip:
        self.check(name)
        lib = _library()
        arch, tag = split(name)
        if weights not in ("default", "none") and tag is not None:
            raise UserError(f"open_clip:{name} names its weights (the tag {tag!r}) and --weights names {weights}: "
                            f"give one, open_clip:{arch} --weights {weights} or open_clip:{name}")
        if weights == "default" and tag is None:
            tags = lib.list_pretrained_tags_by_model(arch)
            raise UserError(f"open_clip:{arch} names no pretrained weights: add a tag (open_clip:{arch}/"
                            f"{tags[0] if tags else 'PRETRAINED'}; its tags: {', '.join(tags) or 'none'}), or pass "
                            "--weights FILE (a checkpoint) or --weights none (random)")
        tag_cfg = lib.get_pretrained_cfg(arch, tag) if tag else {}
        checkpoint = _tag_checkpoint(arch, tag) if weights == "default" else None
        if weights not in ("default", "none"):
            if not Path(weights).is_file():
                raise UserError(f"weights file {weights} does not exist; pass --weights PATH, 'default' or 'none'")
            checkpoint = weights
        forced = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        with torch.random.fork_rng(devices=[]), _quiet_library():
            torch.manual_seed(0)  # random weights are the same in every worker process
            model = lib.create_model(arch, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                                     force_preprocess_cfg=forced)
            if checkpoint is not None:
                try:
                    lib.load_checkpoint(model, checkpoint)
                except Exception as e:  # a wrong or damaged file: the user's, named
                    raise UserError(f"weights {checkpoint} do not fit open_clip:{arch}: {str(e).splitlines()[0]}; "
                                    "is it a checkpoint of another architecture?") from None
        source = "default" if weights == "default" else "none" if weights == "none" else str(Path(weights).resolve())
        return _Clip(model.eval(), _preprocess(model, name), source, state_dict_sha256(model.state_dict()))

    def load(self, name: str, weights: str = "default", layer: str | None = None,
             input_size: int | None = None, preprocess: Mapping[str, Any] | None = None) -> Backbone:
        spec = f"{self.name}:{name}"
        if preprocess:
            raise preprocess_refused(spec)
        if layer:
            raise UserError(f"--layer cannot be used with {spec}: the embedding is the image tower's projected output, "
                            "the one a text embedding is comparable with; drop --layer")
        clip = self._create(name, weights)
        tower = self._text_record(name, clip)
        visual = freeze(clip.model.visual)
        dim = check_dim(visual, clip.preprocess, getattr(clip.model, "embed_dim", None) or _text_dim(clip.model), spec)
        return sized(Backbone(spec, visual, dim, clip.preprocess, clip.weights, clip.sha256, None, {}, tower), input_size)

    def classifier(self, name: str, weights: str = "default") -> Classifier:
        raise UserError(f"{self.name}:{name} has no classification head: an image-text model gives embeddings; "
                        "classify with zero-shot class names (embedpipe probe --zero-shot) or a linear probe")

    def text_tower(self, name: str, weights: str = "default") -> TextTower:
        clip = self._create(name, weights)
        arch, _ = split(name)
        record = self._text_record(name, clip)
        try:
            with _quiet_library():
                tokenizer = _library().get_tokenizer(arch, context_length=record["context_length"])
        except Exception as e:  # an HF tokenizer it cannot fetch offline, a missing package
            raise UserError(f"cannot build the tokenizer of open_clip:{name} ({record['tokenizer']}): "
                            f"{str(e).splitlines()[0]}") from None
        model = freeze(_EncodeText(clip.model))
        with torch.inference_mode():
            dim = int(model(tokenizer(["a photo"])).shape[1])
        scale = getattr(clip.model, "logit_scale", None)
        return TextTower(f"{self.name}:{name}", model, tokenizer, dim, record["weights_sha256"], record["tokenizer"],
                         record["context_length"], float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0)

    def _text_record(self, name: str, clip: _Clip) -> dict[str, Any]:
        sd = clip.model.state_dict()
        text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in NOT_TEXT}
        return {"model": f"{self.name}:{name}", "weights_sha256": state_dict_sha256(text),
                "tokenizer": _tokenizer_name(split(name)[0]),
                "context_length": int(getattr(clip.model, "context_length", 0) or 77)}


def _text_dim(model: nn.Module) -> int | None:
    proj = getattr(model, "text_projection", None)
    return int(proj.shape[1]) if isinstance(proj, torch.Tensor) and proj.ndim == 2 else None


def _preprocess(model: nn.Module, name: str) -> Preprocess:
    """The model's own preprocessing (open_clip's ``preprocess_cfg``): CLIP resizes the shorter side to the input
    size (bicubic) and centre-crops, so the resize size is the crop size."""
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise UserError(f"open_clip:{name} takes {size[0]}x{size[1]} inputs; embedpipe crops squares")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        log.warning("open_clip:%s preprocesses with %r interpolation; embedpipe resizes with bicubic", name,
                    interpolation)
        interpolation = "bicubic"
    if cfg.get("resize_mode", "shortest") != "shortest":
        log.warning("open_clip:%s resizes by %r; embedpipe resizes the shorter side and centre-crops, so on images "
                    "that are not square its embeddings differ from open_clip's own", name, cfg["resize_mode"])
    return Preprocess(int(size), int(size), interpolation, tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                      tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))))


SOURCE = OpenClipSource()
