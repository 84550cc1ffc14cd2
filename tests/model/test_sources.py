"""The model-source registry (model/sources/): names found without a list, one signature, spec resolution, timm's
names built once, sources without a classifier refused by the callers that need one, and a new source as one module."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.errors import UserError
from pipeline.model import sources
from pipeline.model.backbones import load_backbone, load_classifier
from pipeline.model.deprecations import torchscript_calls
from pipeline.model.sources import ModelSource, get_source, register, resolve_spec, source_names
from pipeline.records import EmbeddingMeta, ModelIdentity

def test_unknown_source_is_a_user_error_listing_the_names():
    assert {"open_clip", "timm", "torchvision", "torchscript"} <= set(source_names())
    with pytest.raises(UserError, match="unknown model source 'hf'; choose one of: open_clip, timm, torchscript, "
                                        "torchvision"):
        get_source("hf")


def test_unknown_bare_name_error_lists_the_spec_forms():
    with pytest.raises(UserError) as e:
        resolve_spec("no_such_model_anywhere")
    assert "unknown model 'no_such_model_anywhere': not a timm or torchvision model." in str(e.value)
    assert str(e.value).endswith("Specs look like timm:<name>, torchvision:<name>, open_clip:<arch>[/<pretrained>] "
                                 "or torchscript:<path>.")
    with pytest.raises(UserError, match="has no name after 'timm:'"):
        resolve_spec("timm:")


def test_listing_sources_imports_neither_torch_nor_timm():
    code = ("import sys\nfrom pipeline.model.sources import source_names, resolve_spec\n"
            "assert 'timm' in source_names()\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _signature(f) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", source_names())
def test_every_source_has_the_one_signature(name):
    source = get_source(name)
    assert source.name == name  # the module's name is the spec prefix
    assert isinstance(source.argument, str) and source.argument.startswith("<")
    assert isinstance(source.about, str) and source.about
    assert source.bare_order is None or isinstance(source.bare_order, int)
    assert isinstance(source.has_classifier, bool) and isinstance(source.takes_preprocess, bool)
    assert isinstance(source.runs_code, bool) and isinstance(source.has_text_tower, bool)
    for method in ("names", "check", "load", "classifier", "text_tower"):
        assert _signature(getattr(source, method)) == _signature(getattr(ModelSource, method)), (name, method)
    assert isinstance(source.names(), frozenset)


def test_bare_names_never_reach_a_source_that_runs_files():
    assert get_source("torchscript").bare_order is None and not get_source("torchscript").names()
    orders = [get_source(n).bare_order for n in source_names() if get_source(n).bare_order is not None]
    assert len(orders) == len(set(orders))  # the lookup order of bare names is never a tie


def test_timm_names_are_built_once_per_process(monkeypatch):
    import timm

    from pipeline.model.sources import timm as timm_source

    calls = []
    real = timm.list_models

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "list_models", counting)
    timm_source.model_names.cache_clear()
    try:
        assert resolve_spec("mobilenetv3_small_050") == ("timm", "mobilenetv3_small_050")
        assert resolve_spec("timm:resnet50.a1_in1k") == ("timm", "resnet50.a1_in1k")
        assert resolve_spec("regnet_x_400mf") == ("torchvision", "regnet_x_400mf")  # timm asked first, then torchvision
        with pytest.raises(UserError, match="Did you mean timm:efficientnet_lite0"):
            resolve_spec("timm:efficientnet_lit0")
        with pytest.raises(UserError, match="Did you mean"):
            resolve_spec("resnet51")
        assert load_backbone("timm:resnet18", "none", input_size=64).num_features == 512
    finally:
        timm_source.model_names.cache_clear()  # the next lookup builds the set from the real list_models
    assert len(calls) == 1


def _torchscript_file(tmp_path: Path) -> Path:
    bb = load_backbone("torchvision:resnet18", "none", input_size=64)
    path = tmp_path / "feat.pt"
    with torchscript_calls():
        with torchscript_calls():
            torch.jit.save(torch.jit.trace(bb.model, torch.zeros(1, 3, 64, 64)), str(path))
    return path


def test_a_source_without_classifier_is_refused_by_export_and_finetune(tmp_path):
    from pipeline.probe.export import check_exportable
    from pipeline.probe.finetune import run_finetune
    from pipeline.probe.options import FinetuneOptions

    path = _torchscript_file(tmp_path)
    ts = load_backbone(f"torchscript:{path}")
    assert ts.spec == f"torchscript:{path.resolve()}"
    expected = r"needs a model with a classification head \(timm:, torchvision: models\); torchscript:.* has none"

    emb = tmp_path / "emb" / "embeddings"
    emb.mkdir(parents=True)
    x = np.ones((2, ts.num_features), np.float32)
    meta = EmbeddingMeta(ts.identity, ts.num_features, "float32", version="test")
    store.write_table(emb / "s.parquet", store.embedding_table(["a", "b"], "s.tar", [0, 1], [0, 1], x, "float32",
                                                                metadata=meta))
    with pytest.raises(UserError, match="--export-classifier " + expected):
        check_exportable(tmp_path / "emb")

    # refused before any data is read: these shards do not exist
    with pytest.raises(UserError, match="finetune " + expected):
        run_finetune(["/nonexistent/train.tar"], ["/nonexistent/val.tar"], tmp_path / "ft",
                     FinetuneOptions(model=f"torchscript:{path}", weights="none"))
    with pytest.raises(UserError, match="loading a classifier " + expected):
        load_classifier(f"torchscript:{path}")


TINY_SOURCE = '''
"""A test source: a tiny conv net with a Linear classifier, built by the shared helpers."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones import Backbone, Classifier, classifier_with_weights, features_of
from ..layers import remove_head
from ..preprocess import Preprocess


class Tiny(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.pool(self.stem(x).relu()).flatten(1))


@dataclass(frozen=True)
class TinySource:
    name: str = "tinytest"
    argument: str = "<width>"
    about: str = "a tiny conv net, for the registry's tests"
    bare_order: int | None = None
    runs_code: bool = False
    has_classifier: bool = True
    takes_preprocess: bool = False

    def names(self) -> frozenset[str]:
        return frozenset()

    def check(self, name: str) -> None:
        if not name.isdigit():
            raise ValueError("a width")

    def load(self, name: str, weights: str = "default", layer: str | None = None,
             input_size: int | None = None, preprocess=None) -> Backbone:
        return features_of(self.classifier(name, weights), layer, input_size, lambda c: remove_head(c.model, c.spec))

    def classifier(self, name: str, weights: str = "default") -> Classifier:
        return classifier_with_weights(f"{self.name}:{name}", weights,
                                       lambda pretrained: (Tiny(int(name)), Preprocess(32, 36), {}))


SOURCE = TinySource()
'''


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A source module in a folder of the registry's package path, for this test only."""
    (tmp_path / "tinytest.py").write_text(TINY_SOURCE)
    monkeypatch.setattr(sources, "__path__", [*sources.__path__, str(tmp_path)])
    yield "tinytest"
    sys.modules.pop("pipeline.model.sources.tinytest", None)


def test_a_new_source_is_one_module(tiny_source, tmp_path):
    assert tiny_source in source_names()
    bb = load_backbone("tinytest:8", "none")
    assert (bb.spec, bb.num_features, bb.head) == ("tinytest:8", 8, {"attr": "fc", "in_features": 8})
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    assert bb.identity == ModelIdentity("tinytest:8", bb.weights_sha256, None, bb.preprocess.to_dict(), "none")
    assert load_backbone("tinytest:8", "none").weights_sha256 == bb.weights_sha256  # seeded alike in every process
    assert load_backbone("tinytest:8", "none", input_size=48).preprocess.input_size == 48
    assert load_backbone("tinytest:8", "none", layer="stem").num_features == 8

    clf = load_classifier("tinytest:8", "none")
    path = tmp_path / "w.pt"
    torch.save({k: torch.randn_like(v) for k, v in clf.model.state_dict().items()}, path)
    from_file = load_backbone("tinytest:8", str(path))
    assert from_file.weights == str(path.resolve()) and from_file.weights_sha256 != bb.weights_sha256
    with pytest.raises(UserError, match="not a timm or torchvision model"):
        resolve_spec("8")  # bare names never reach a source without a bare_order


def test_a_registered_source_is_found_and_names_are_not_taken(monkeypatch):
    monkeypatch.setattr(sources.SOURCES, "registered", {})
    plugin = get_source("torchscript").__class__(name="plugin")
    assert register(plugin) is plugin and get_source("plugin") is plugin and "plugin" in source_names()
    with pytest.raises(UserError, match="a model source named 'timm' exists already"):
        register(get_source("timm").__class__())
