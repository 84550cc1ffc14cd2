"""--export-classifier: backbone + trained head as TorchScript for raw images, same classes as `predict`."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.embedding.runner import embed
from pipeline.embedding.tar import iter_tar_samples
from pipeline.model.backbones import load_backbone
from pipeline.model.decoders.cpu import decode_rgb
from pipeline.model.image_header import read_header
from pipeline.probe.export import FeatureHead, attach_head, export_classifier
from pipeline.probe.linear import run_probe
from pipeline.probe.options import ProbeOptions
from pipeline.probe.predict import run_predict
from pipeline.sample_data import DIGIT_NAMES
from pipeline.model.deprecations import torchscript_calls
import tiny

TINY = tiny.options(device="cpu", compile=None)


@pytest.fixture(scope="module")
def digit_embeddings(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("digit-emb")
    summary = embed([str(s) for s in digits_shards], out, cache_dir=str(out / "cache"), **TINY)
    assert not summary.failed
    return out


def raw_images(shards):
    keys, images = [], []
    for s in shards:
        for sample in iter_tar_samples(str(s)):
            keys.append(sample["__key__"])
            images.append(decode_rgb(sample["jpg"], read_header(sample["jpg"], 64), 64))
    return keys, images


@pytest.mark.slow
def test_exported_classifier_matches_predict(digit_embeddings, digits_shards, tmp_path):
    m = run_probe(digit_embeddings, tmp_path / "probe", ProbeOptions(label_field="label", weight_decays=(1e-4, 1e-2)))
    assert m["num_classes"] == 10
    export_classifier(tmp_path / "probe", tmp_path / "clf.pt")
    run_predict(tmp_path / "probe", digit_embeddings, tmp_path / "pred")
    pred = pq.ParquetDataset(tmp_path / "pred").read()
    want = dict(zip(pred.column("key").to_pylist(), pred.column("class_name").to_pylist()))
    want_p = dict(zip(pred.column("key").to_pylist(), pred.column("probability").to_pylist()))

    extra = {"embedpipe.json": ""}
    with torchscript_calls():
        clf = torch.jit.load(str(tmp_path / "clf.pt"), _extra_files=extra)
    assert clf.classes == m["classes"] == sorted({"zero", "one", "two", "three", "four", "five", "six", "seven",
                                                   "eight", "nine"})
    assert json.loads(extra["embedpipe.json"])["feature_spec"]["normalize"] is True
    keys, images = raw_images(digits_shards)
    with torch.no_grad():
        cls, prob = clf.predict(torch.stack(images))
        one = clf(images[0])  # a single [3,H,W] image
        listed = clf.forward_list(images[:3])
    got = [clf.classes[i] for i in cls.tolist()]
    assert got == [want[k] for k in keys]  # same class for every one of the 300 images
    assert max(abs(float(p) - want_p[k]) for k, p in zip(keys, prob)) < 1e-3
    assert one.shape == (1, 10) and torch.equal(one.argmax(1), cls[:1]) and torch.equal(listed.argmax(1), cls[:3])


def test_head_replaces_the_classifier():
    bb = load_backbone("torchvision:resnet18", weights="none")
    head = FeatureHead(torch.nn.Linear(512, 3), normalize=True, fp16_round=False)
    model = attach_head(bb, head)
    assert model is bb.model and model.fc is head  # model.fc = the trained head
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_cli_probe_with_export(digit_embeddings, tmp_path):
    r = CliRunner().invoke(cli, ["probe", str(digit_embeddings), "--out", str(tmp_path / "p"), "-q",
                                 "--weight-decays", "1e-3", "--export-classifier", str(tmp_path / "c.pt")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("probe: top-1 ") and "classifier" in r.output
    with torchscript_calls():
        assert torch.jit.load(str(tmp_path / "c.pt")).classes == list(DIGIT_NAMES)  # named by the json label
    r = CliRunner().invoke(cli, ["knn", str(digit_embeddings), "-k", "5"])
    assert r.exit_code == 0 and r.stdout.startswith("knn: k=5 top-1 "), r.output  # the log (stderr) says where names came from
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "p"), str(digit_embeddings)])
    assert r.exit_code == 0 and "300 rows from 3 shard(s)" in r.output, r.output
