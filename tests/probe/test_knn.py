"""k-NN evaluation: clustered data, the streamed top-k against brute force, options and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.probe.knn import knn_scores, run_knn
from probe_fixtures import blobs, write_shards


def brute_force(xt, yt, xq, c, k, t):
    nt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    nq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    sim = nq @ nt.T
    out = np.zeros((len(xq), c))
    for i, row in enumerate(sim):
        top = np.argsort(-row, kind="stable")[:k]
        np.add.at(out[i], yt[top], np.exp(row[top] / t))
    return out


def test_streamed_topk_equals_brute_force():
    rng = np.random.default_rng(0)
    xt, yt = rng.normal(size=(700, 16)).astype(np.float32), rng.integers(0, 7, 700)
    xq = rng.normal(size=(90, 16)).astype(np.float32)
    batches = [(xt[i:i + 128], yt[i:i + 128]) for i in range(0, 700, 128)]  # 6 batches, the last one short
    got = knn_scores(batches, xq, 7, ks=(10, 20), temperature=0.07, chunk=32)
    for k in (10, 20):
        assert np.allclose(got[k].numpy(), brute_force(xt, yt, xq, 7, k, 0.07), rtol=1e-4)
    # fewer training rows than k: every row votes
    small = knn_scores([(xt[:5], yt[:5])], xq, 7, ks=(10,))
    assert np.allclose(small[10].numpy(), brute_force(xt[:5], yt[:5], xq, 7, 5, 0.07), rtol=1e-4)


def test_knn_on_clustered_data(tmp_path):
    x, y = blobs(n=800, d=32, c=8, spread=0.5, seed=4)
    emb = write_shards(tmp_path / "emb", x, y)
    r = run_knn(emb, val_fraction=0.25, out=tmp_path / "knn.json")
    assert r["top1"][10] >= 0.99 and r["top1"][20] >= 0.99 and r["top5"][20] == 1.0
    assert r["n_train"] + r["n_val"] == 800 and r["num_classes"] == 8
    assert json.loads((tmp_path / "knn.json").read_text())["top1"]["20"] == r["top1"][20]


def test_knn_string_labels_and_val_folder(tmp_path):
    x, y = blobs(n=300, spread=0.5, seed=6)
    train = write_shards(tmp_path / "t", x[:200], y[:200], names=["a", "b", "c", "d"], prefix="t")
    val = write_shards(tmp_path / "v", x[200:], y[200:], names=["a", "b", "c", "d"], prefix="v")
    r = run_knn(train, val=val, label_field="name", ks=(5,))
    assert r["n_val"] == 100 and r["top1"][5] >= 0.99 and "top5" not in r


def test_knn_errors(tmp_path):
    x, y = blobs(n=50)
    emb = write_shards(tmp_path / "emb", x, y, labels=False)
    with pytest.raises(UserError, match="no labels found"):
        run_knn(emb)
    with pytest.raises(UserError, match="--k"):
        run_knn(emb, ks=(0,))
    with pytest.raises(UserError, match="does not exist"):
        run_knn(tmp_path / "missing")
