"""finetune: last blocks + head on tar shards improve over epoch 0, resume from the checkpoint, export."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.backbones import load_backbone
from pipeline.probe.finetune import blocks, run_finetune
from pipeline.probe.options import FinetuneOptions
from pipeline.sample_data import DIGIT_NAMES
from pipeline.model.deprecations import torchscript_calls


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CI cores: a thread pool is slower here
    yield
    torch.set_num_threads(before)


def test_blocks_of_resnet():
    bb = load_backbone("torchvision:resnet18", weights="none")
    names = [n for n, _ in blocks(bb.model, bb.model.fc)]
    assert names == ["conv1+bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                     "layer4.0", "layer4.1"]


@pytest.mark.slow
def test_finetune_improves_and_resumes(digits_shards, tmp_path, one_thread):
    train, val = [str(s) for s in digits_shards[:2]], [str(digits_shards[2])]
    opts = FinetuneOptions(model="torchvision:resnet18", weights="none", input_size=48, epochs=3, batch_size=25,
                           unfreeze=1, hflip=False, lr=3e-3, stop_after=2)
    first = run_finetune(train, val, tmp_path, opts)  # "interrupted" after 2 of 3 epochs
    assert [h["epoch"] for h in first["history"]] == [0, 1] and not first["done"]
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "classifier.pt").exists()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(k.startswith(("model.layer4.1.", "model.fc.")) for k in ck["weights"])  # only what trains is saved
    r = run_finetune(train, val, tmp_path, FinetuneOptions(**{**opts.__dict__, "stop_after": None}))
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2] and r["done"]
    assert r["history"][:2] == first["history"]  # resumed, not restarted
    acc = [h["val_top1"] for h in r["history"]]
    assert acc[-1] > acc[0] + 0.1, acc
    assert r["trained_blocks"] == ["layer4.1"] and 0.0 < r["probe_top1"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["history"][-1]["val_top1"] == acc[-1]
    with torchscript_calls():
        clf = torch.jit.load(str(tmp_path / "classifier.pt"))
    assert clf.classes == list(DIGIT_NAMES)  # named by the shards' json label
    assert clf(torch.zeros(2, 3, 80, 60, dtype=torch.uint8)).shape == (2, 10)
    with pytest.raises(UserError, match="other settings"):
        run_finetune(train, val, tmp_path, FinetuneOptions(**{**opts.__dict__, "unfreeze": 2}))


def test_missing_shards_are_a_clear_error_before_training(digits_shards, tmp_path):
    with pytest.raises(UserError, match="nope.tar does not exist"):
        run_finetune([str(digits_shards[0])], [str(tmp_path / "nope.tar")], tmp_path / "ft",
                     FinetuneOptions(model="torchvision:resnet18", weights="none", input_size=48, epochs=1))
    assert not (tmp_path / "ft").exists()


def test_baseline_is_the_probe_on_the_same_split(digits_shards, tmp_path, one_thread, caplog):
    """The baseline finetune reports is what `embedpipe probe` gives on the frozen features of the same split,
    and progress is logged while its features are extracted, before its result."""
    import tiny
    from pipeline.embedding.runner import embed
    from pipeline.probe.linear import run_probe
    from pipeline.probe.options import ProbeOptions

    train, val = [str(s) for s in digits_shards[:2]], [str(digits_shards[2])]
    embed(train, tmp_path / "emb", **tiny.options(out_dtype="float32"))
    embed(val, tmp_path / "val", **tiny.options(out_dtype="float32"))
    probe = run_probe(tmp_path / "emb", tmp_path / "probe", ProbeOptions(val=str(tmp_path / "val")))
    caplog.set_level(logging.INFO, logger="pipeline")
    r = run_finetune(train, val, tmp_path / "ft", FinetuneOptions(
        model=tiny.MODEL, weights="none", input_size=64, epochs=1, batch_size=50, unfreeze=0, hflip=False))
    assert r["probe_top1"] == pytest.approx(probe["top1"], abs=1e-6), (r["probe_top1"], probe["top1"])
    lines = [rec.getMessage() for rec in caplog.records]

    def first(text):
        return next(i for i, line in enumerate(lines) if text in line)
    features = first("finetune baseline: training features: 200/200 img")  # the Progress line
    result = first(f"linear probe baseline: val top-1 {probe['top1'] * 100:.2f}%")
    assert first("finetune: reading the labels") < features < result < first("finetune epoch 1/1: val top-1"), lines
    assert first("finetune epoch 1/1 validation: 100 img") < first("finetune epoch 1/1: val top-1")


def test_best_epoch_is_reported_kept_and_exported(digits_shards, tmp_path, monkeypatch):
    """A later epoch that is worse does not replace the best one: reported, in metrics.json, resumed and exported."""
    from pipeline.probe import finetune

    scripted = {1: 0.5, 2: 0.8, 3: 0.6}  # val top-1 of epochs 1..3: the second is the best
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: scripted[int(a[-1].split()[2].split("/")[0])])
    train, val = [str(digits_shards[0])], [str(digits_shards[1])]
    opts = FinetuneOptions(model="torchvision:resnet18", weights="none", input_size=32, epochs=3, batch_size=50,
                           unfreeze=0, hflip=False, lr=0.05, compare_probe=False, stop_after=2)
    run_finetune(train, val, tmp_path, opts)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["best"]["epoch"] == 1
    r = run_finetune(train, val, tmp_path, FinetuneOptions(**{**opts.__dict__, "stop_after": None}))  # resumes
    assert [h["val_top1"] for h in r["history"]] == [0.5, 0.8, 0.6]
    assert r["best_epoch"] == 1 and r["best_val_top1"] == 0.8
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best_epoch"] == 1 and saved["best_val_top1"] == 0.8
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    best, last = ck["best"]["weights"]["model.fc.weight"], ck["weights"]["model.fc.weight"]
    assert not torch.equal(best, last)  # the third epoch did train on
    with torchscript_calls():
        clf = torch.jit.load(str(tmp_path / "classifier.pt"))
    exported = [v for k, v in clf.state_dict().items() if k.endswith("fc.weight")]
    assert len(exported) == 1 and torch.equal(exported[0], best)
    assert clf.classes == r["classes"] == list(DIGIT_NAMES)  # the digit shards' json label names each class (was "0")
