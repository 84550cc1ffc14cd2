"""Probes on the real sample shards (issue 26, item 6): class names instead of "15", and a split that keeps every
variant of one photo on one side."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from pipeline.probe.classes import NameScan, name_classes
from pipeline.probe.head import load_head
from pipeline.probe.labels import LabelSource, load_split, plan_stream, stable_split
from pipeline.sample_data import DIGIT_NAMES, PHOTO_CLASSES

import tiny

PHOTO = LabelSource.make(field="photo")  # the json field naming the photo a sample was cut from
CLASS_NAMES = [name for name, _ in PHOTO_CLASSES]


@pytest.fixture(scope="module")
def digit_emb(digits_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digit-emb")
    assert not embed([str(s) for s in digits_shards], out, **tiny.options()).failed  # keeps json (the default)
    return out


@pytest.fixture(scope="module")
def photo_emb(photo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photo-emb")
    assert not embed([str(s) for s in photo_shards], out, **tiny.options()).failed
    return out


@pytest.fixture(scope="module")
def photo_txt_only(photo_shards, tmp_path_factory) -> Path:
    """The photos with only their txt kept: it names the photo, and a class holds several photos."""
    out = tmp_path_factory.mktemp("photo-txt")
    assert not embed([str(s) for s in photo_shards], out, **tiny.options(keep=("txt",))).failed
    return out


# ---- class names ----

def test_digit_classes_are_named_in_every_output(digit_emb, tmp_path, embedpipe):
    """Labels from .cls came out as "7"; the shards' json label names each digit one-to-one, so the report,
    metrics.json, head.pt, predict's class_name and k-NN's classes say "seven"."""
    code, out, err = embedpipe("probe", digit_emb, "--out", tmp_path / "p", "--weight-decays", "1e-3")
    assert code == 0, err
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["classes"] == list(DIGIT_NAMES) and set(metrics["per_class"]) == set(DIGIT_NAMES)
    assert metrics["split"]["class_names"] == "json.label"
    report = (tmp_path / "p" / "report.txt").read_text()
    assert "class names: from json.label" in report and "\n  seven: " in report and "\n  7: " not in report
    head = load_head(tmp_path / "p")
    assert head.classes == list(range(10)) and head.class_names == list(DIGIT_NAMES)  # ids keep the labels
    assert torch.load(tmp_path / "p" / "head.pt", weights_only=True)["class_names"] == list(DIGIT_NAMES)

    code, out, err = embedpipe("predict", tmp_path / "p", digit_emb, "--out", tmp_path / "pred")
    assert code == 0, err
    t = pq.read_table(sorted((tmp_path / "pred").glob("*.parquet"))[0])
    assert [DIGIT_NAMES[c] for c in t.column("class").to_pylist()] == t.column("class_name").to_pylist()

    code, out, err = embedpipe("knn", digit_emb, "-k", "5", "--out", tmp_path / "knn.json")
    assert code == 0, err
    assert json.loads((tmp_path / "knn.json").read_text())["classes"] == list(DIGIT_NAMES)


def test_photo_classes_take_the_json_label(photo_emb, tmp_path, caplog):
    from pipeline.probe.linear import run_probe
    from pipeline.probe.options import ProbeOptions

    with caplog.at_level(logging.INFO, logger="pipeline"):
        metrics = run_probe(photo_emb, tmp_path / "p", ProbeOptions(weight_decays=(1e-3,), group_field="photo"))
    assert metrics["classes"] == CLASS_NAMES  # in label order: the .cls values index PHOTO_CLASSES
    assert any("class names from json.label: 0=portrait, 1=texture" in r.getMessage() for r in caplog.records)


def test_a_column_naming_several_labels_keeps_numbers_and_says_why(photo_txt_only, tmp_path, embedpipe, caplog):
    """txt names the photo, and a class holds several photos: no one-to-one names, so the numbers stay, and the
    log says why and how to name them."""
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code, out, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "p", "--weight-decays", "1e-3",
                                   "--group-field", "photo")
    assert code == 2 and "no column 'json' for --group-field photo" in err  # txt only: nothing to group by
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code, out, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "p", "--weight-decays", "1e-3")
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["classes"] == [str(i) for i in range(6)]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "class names: the integer labels (no json column; txt: label" in said and "is named both" in said
    assert "--class-names FILE" in said


def test_class_names_file(photo_txt_only, tmp_path, embedpipe):
    lines = tmp_path / "names.txt"
    lines.write_text("\n".join(CLASS_NAMES) + "\n")
    code, _, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "a", "--class-names", lines, "-q")
    assert code == 0, err
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["classes"] == CLASS_NAMES and metrics["split"]["class_names"] == f"--class-names {lines}"

    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({str(i): n.upper() for i, n in enumerate(CLASS_NAMES)}))
    code, _, err = embedpipe("knn", photo_txt_only, "--class-names", mapping, "-k", "3", "--out", tmp_path / "k.json")
    assert code == 0, err
    assert json.loads((tmp_path / "k.json").read_text())["classes"] == [n.upper() for n in CLASS_NAMES]

    short = tmp_path / "short.txt"
    short.write_text("\n".join(CLASS_NAMES[:5]))
    code, _, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "b", "--class-names", short, "-q")
    assert code == 2 and "names no label 5" in err
    twice = tmp_path / "twice.txt"
    twice.write_text("\n".join(["same"] * 6))
    code, _, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "b", "--class-names", twice, "-q")
    assert code == 2 and "gives 'same' to more than one label" in err
    code, _, err = embedpipe("probe", photo_txt_only, "--out", tmp_path / "b", "--class-names", tmp_path / "no.txt")
    assert code == 2 and "--class-names" in err and "does not exist" in err
    assert not (tmp_path / "b").exists()


def test_the_naming_rule(tmp_path):
    """One name per label and one label per name, across every row fed; the first such column wins."""
    scan = NameScan()
    scan.add([0, 1, 0, None], {("json", "label"): ["cat", "dog", "cat", "bird"], ("txt", None): ["a", "b", "c", "d"]})
    assert scan.names_for([0, 1]) == (["cat", "dog"], "json.label")
    scan.add([1], {("json", "label"): ["cat"]})  # label 1 now has two names
    names, why = scan.names_for([0, 1])
    assert names is None and why == ("json.label: label 1 is named both 'dog' and 'cat'; "
                                     "txt: label 0 is named both 'a' and 'c'")
    scan = NameScan()
    scan.add([0, 1], {("json", "label"): ["cat", "cat"]})
    assert scan.names_for([0, 1])[1] == "json.label: 'cat' names both label 0 and label 1; no txt column"
    scan = NameScan()
    scan.add([0, 1, 2], {("txt", None): ["zero", " one ", None]})
    assert scan.names_for([0, 1, 2]) == (None, "no json column; txt names no row of label 2")
    assert scan.names_for([0, 1]) == (["zero", "one"], "txt")
    assert name_classes(["a", "b"], scan, None) == (None, "the labels")  # string labels are their own names
    (tmp_path / "names.txt").write_text("first\nsecond\n")
    assert name_classes([0, 1], scan, tmp_path / "names.txt") == (["first", "second"], f"--class-names {tmp_path}/names.txt")
    with pytest.raises(UserError, match="names labels by position, but the labels are not integers"):
        name_classes(["a", "b"], scan, tmp_path / "names.txt")


# ---- the grouped split ----

def photo_of(keys: list[str]) -> list[str]:
    return [k.removeprefix("photos_").rsplit("_", 1)[0] for k in keys]


def test_photo_variants_never_fall_on_both_sides(photo_emb):
    """Each photo's variants are near copies; split by key, the probe saw a variant of every validation photo in
    training. Grouped by the json's photo field, every photo lies on one side, and every class has both sides."""
    train, val, cmap, info = load_split(photo_emb, LabelSource(), val_fraction=0.2, group=PHOTO)
    assert set(photo_of(train.keys)).isdisjoint(photo_of(val.keys))
    assert set(photo_of(train.keys)) | set(photo_of(val.keys)) == {p for _, ps in PHOTO_CLASSES for p in ps}
    assert set(train.y) == set(val.y) == set(range(len(PHOTO_CLASSES)))
    assert info["method"] == "group-hash" and info["group"] == "json.photo" and info["ungrouped"] == 0
    assert (info["train"], info["val"]) == (len(train.y), len(val.y)) and 0.15 < len(val.y) / 54 < 0.45

    strain, sval, _, sinfo = plan_stream(photo_emb, LabelSource(), val_fraction=0.2, group=PHOTO)  # streamed: same
    assert sinfo == info and len(sval) == len(val.y) and len(strain) == len(train.y)

    ptrain, pval, _, _ = load_split(photo_emb, LabelSource(), val_fraction=0.2)
    assert not set(photo_of(ptrain.keys)).isdisjoint(photo_of(pval.keys))  # by key alone, photos lie on both sides


def test_cli_probe_and_knn_with_group_field(photo_emb, tmp_path, embedpipe):
    code, out, err = embedpipe("probe", photo_emb, "--out", tmp_path / "p", "--group-field", "photo", "-q")
    assert code == 0, err
    split = json.loads((tmp_path / "p" / "metrics.json").read_text())["split"]
    assert split["method"] == "group-hash" and split["group"] == "json.photo"
    code, out, err = embedpipe("knn", photo_emb, "--group-field", "photo", "-k", "3", "--out", tmp_path / "k.json")
    assert code == 0, err
    assert json.loads((tmp_path / "k.json").read_text())["split"]["method"] == "group-hash"
    code, out, err = embedpipe("probe", photo_emb, "--out", tmp_path / "v", "--group-field", "photo", "--val",
                               photo_emb)
    assert code == 2 and "with --val there is no split" in err


def test_grouped_stable_split_exactly():
    keys = [f"k{i}" for i in range(12)]
    ids = np.array([0] * 8 + [1] * 4)
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e", "e", "e"]  # class 1: one group, all training
    mask = stable_split(keys, ids, 0.25, groups=groups)
    assert mask[8:].sum() == 0 and mask[:8].sum() == 2  # 25% of 8 rows: one whole group of two
    val_groups = {g for g, m in zip(groups, mask) if m}
    assert len(val_groups) == 1 and all(m == (g in val_groups) for g, m in zip(groups, mask))
    perm = np.random.default_rng(0).permutation(12)  # the same groups whatever the row order, and the shards
    again = stable_split([keys[i] for i in perm], ids[perm], 0.25, [f"s{i % 3}" for i in perm],
                         [groups[i] for i in perm])
    assert np.array_equal(again, mask[perm])
    lone = stable_split(keys[:8], ids[:8], 0.25, groups=[None] * 8)  # no group value: each row its own group
    assert np.array_equal(lone, stable_split(keys[:8], ids[:8], 0.25))
