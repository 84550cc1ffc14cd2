"""Linear probe: accuracy on separable data, the stable split, string labels, predict, sklearn parity, errors."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import store
from pipeline.errors import UserError
from pipeline.probe.head import load_head
from pipeline.probe.labels import ClassMap, LabelSource, load_split, stable_split
from pipeline.probe.linear import run_probe
from pipeline.probe.options import ProbeOptions
from pipeline.probe.predict import PREDICTION_SCHEMA, run_predict
from probe_fixtures import blobs, write_shards

FAST = dict(weight_decays=(1e-5, 1e-3, 1e-1), max_iter=200)


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    x, y = blobs(n=600, d=32, c=4, spread=0.3)
    return write_shards(tmp_path_factory.mktemp("sep"), x, y)


def test_separable_features_reach_100_percent(separable, tmp_path):
    m = run_probe(separable, tmp_path, ProbeOptions(**FAST))
    assert m["top1"] == 1.0
    assert m["hyperparameters"]["method"] == "lbfgs" and m["hyperparameters"]["weight_decay"] in FAST["weight_decays"]
    assert "top5" not in m  # only 4 classes
    assert np.trace(np.array(m["confusion"])) == m["n_val"] == m["split"]["val"]
    assert m["split"]["train"] + m["split"]["val"] == 600
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == 1.0 and len(saved["grid"]) == 3
    head = torch.load(tmp_path / "head.pt", weights_only=True)  # plain tensors, lists and dicts only
    assert head["weight"].shape == (4, 32) and head["classes"] == [0, 1, 2, 3]
    assert head["feature_spec"]["model"] == "test:blobs" and head["feature_spec"]["dim"] == 32
    assert "confusion" in (tmp_path / "report.txt").read_text()


def test_streaming_sgd_when_features_exceed_memory_budget(separable, tmp_path):
    m = run_probe(separable, tmp_path, ProbeOptions(max_memory_gb=1e-6, epochs=5, weight_decays=(0.0, 1e-4),
                                                     learning_rates=(0.01, 0.1), batch_size=64))
    assert m["hyperparameters"]["method"] == "sgd" and len(m["grid"]) == 4
    assert m["top1"] >= 0.99
    # the streamed split is the in-memory split
    ref = run_probe(separable, tmp_path / "ref", ProbeOptions(**FAST))
    assert (m["split"]["train"], m["split"]["val"]) == (ref["split"]["train"], ref["split"]["val"])


def test_stable_split_is_stratified_and_order_independent():
    rng = np.random.default_rng(1)
    keys = [f"img-{i}" for i in range(1000)]
    ids = rng.integers(0, 5, 1000)
    a = stable_split(keys, ids, 0.2)
    assert np.array_equal(a, stable_split(keys, ids, 0.2))  # same on every run
    perm = rng.permutation(1000)
    b = stable_split([keys[i] for i in perm], ids[perm], 0.2)
    assert {keys[i] for i in perm[b]} == {keys[i] for i in np.flatnonzero(a)}  # whatever the row order
    for c in range(5):
        n_c = (ids == c).sum()
        assert a[ids == c].sum() == round(0.2 * n_c)  # stratified
    assert not stable_split(["only"], np.array([0]), 0.5).any()  # a singleton class stays in training


def test_split_is_the_same_across_shard_layouts(tmp_path):
    x, y = blobs(n=300, seed=3)
    three = write_shards(tmp_path / "three", x, y, shards=3)
    five = write_shards(tmp_path / "five", x, y, shards=5)
    src = LabelSource()
    _, v3, _, _ = load_split(three, src, val_fraction=0.25)
    _, v5, _, _ = load_split(five, src, val_fraction=0.25)
    assert sorted(v3.keys) == sorted(v5.keys) and len(v3.keys) > 60


def test_string_labels_from_json_field(tmp_path):
    names = ["eel", "cat", "fox", "dog"]
    x, y = blobs(n=400, spread=0.3, seed=2)
    emb = write_shards(tmp_path / "emb", x, y, names=names)
    m = run_probe(emb, tmp_path / "probe", ProbeOptions(label_field="name", plots=True, **FAST))
    assert m["classes"] == sorted(names) and m["top1"] == 1.0
    assert set(m["per_class"]) == set(names)
    assert (tmp_path / "probe" / "confusion.png").stat().st_size > 1000
    head = load_head(tmp_path / "probe")
    assert head.classes == sorted(names) and head.label_source == {"column": "json", "field": "name"}
    run_predict(tmp_path / "probe", emb, tmp_path / "pred")
    pred = pq.ParquetDataset(tmp_path / "pred").read()
    truth = {f"k{i:06d}": names[v] for i, v in enumerate(y)}
    got = dict(zip(pred.column("key").to_pylist(), pred.column("class_name").to_pylist()))
    assert got == truth


def test_predict_schema_and_values(separable, tmp_path):
    run_probe(separable, tmp_path / "probe", ProbeOptions(**FAST))
    r = run_predict(tmp_path / "probe", separable)
    assert r["rows"] == 600 and r["files"] == 3
    files = sorted((tmp_path / "probe" / "predictions").glob("*.parquet"))
    assert [f.name for f in files] == [f.name for f in store.list_shards(separable)]
    head = load_head(tmp_path / "probe")
    for f, src in zip(files, store.list_shards(separable)):
        t = pq.read_table(f)
        assert t.schema.remove_metadata() == PREDICTION_SCHEMA
        b = store.read_all(src.parent, files=[src])
        p = torch.softmax(head.logits(b.embeddings), 1)
        assert t.column("key").to_pylist() == b.keys
        assert np.array_equal(t.column("class").to_numpy(), p.argmax(1).numpy())
        assert np.allclose(t.column("probability").to_numpy(), p.max(1).values.numpy(), atol=1e-6)
        assert np.array_equal(t.column("class").to_numpy(), np.array(b.labels))  # separable: all correct


def test_predict_refuses_embeddings_of_another_model(separable, tmp_path):
    run_probe(separable, tmp_path / "probe", ProbeOptions(**FAST))
    x, y = blobs(n=30)
    other = write_shards(tmp_path / "other", x, y, metadata={"model": "test:other"})
    with pytest.raises(UserError, match=r"another model than the probe \(model: probe has 'test:blobs'"):
        run_predict(tmp_path / "probe", other)


def test_val_folder(tmp_path):
    x, y = blobs(n=500, spread=0.3, seed=5)
    train = write_shards(tmp_path / "train", x[:400], y[:400], prefix="t")
    val = write_shards(tmp_path / "val", x[400:], y[400:], prefix="v")
    m = run_probe(train, tmp_path / "probe", ProbeOptions(val=str(val), **FAST))
    assert m["split"]["method"] == "folder" and m["split"]["train"] == 400 and m["n_val"] == 100
    assert m["top1"] == 1.0


def test_matches_sklearn_logistic_regression(tmp_path):
    """Same features, same split, same objective (wd = 1/(C n)): accuracy within 0.5 points per strength."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(n=1200, d=24, c=6, spread=2.2, seed=7)  # overlapping: accuracy well below 100%
    emb = write_shards(tmp_path / "emb", x, y)
    wds = (1e-3, 1e-2)
    m = run_probe(emb, tmp_path / "probe", ProbeOptions(weight_decays=wds, max_iter=500))
    train, val, _, _ = load_split(emb, LabelSource(), val_fraction=0.2)
    sc = StandardScaler().fit(train.x)
    for row in m["grid"]:
        clf = LogisticRegression(C=1.0 / (row["weight_decay"] * len(train.y)), max_iter=2000, tol=1e-8)
        clf.fit(sc.transform(train.x), train.y)
        sk = clf.score(sc.transform(val.x), val.y)
        assert abs(row["val_top1"] - sk) <= 0.005, (row, sk)
    assert 0.5 < m["top1"] < 0.99


@pytest.mark.parametrize("case,match", [
    ("no-labels", "no labels found"), ("one-class", "only one class"), ("missing", "does not exist"),
    ("bad-column", "no label column 'species'"), ("bad-fraction", "between 0 and 1"),
])
def test_bad_input_errors(tmp_path, case, match):
    x, y = blobs(n=60)
    opts = ProbeOptions(**FAST)
    emb = tmp_path / "emb"
    if case == "no-labels":
        write_shards(emb, x, y, labels=False)
    elif case == "one-class":
        write_shards(emb, x, np.zeros_like(y))
    elif case == "missing":
        emb = tmp_path / "nowhere"
    else:
        write_shards(emb, x, y)
        opts = ProbeOptions(label_column="species") if case == "bad-column" else ProbeOptions(val_fraction=1.5)
    with pytest.raises(UserError, match=match):
        run_probe(emb, tmp_path / "probe", opts)
    assert not (tmp_path / "probe" / "head.pt").exists()


def test_class_map_mixes_and_missing():
    cm = ClassMap.from_labels([3, None, 1, 3])
    assert cm.classes == [1, 3] and cm.encode([3, None, 7, 1]).tolist() == [1, -1, -1, 0]
    assert LabelSource.make(field="a.b").value({"json": ['{"a": {"b": "x"}}']}, 0) == "x"
    assert LabelSource.make(field="a.b").value({"json": ["not json"]}, 0) is None


def test_confusion_png_is_titled_with_the_accuracy():
    from pipeline.probe.evaluate import confusion_title

    m = {"top1": 0.9, "top5": 1.0, "n_val": 100, "num_classes": 3}
    assert confusion_title(m) == "linear probe: top-1 90.0% (top-5 100.0%) on 100 validation rows, 3 classes"
