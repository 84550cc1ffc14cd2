"""Recall of text queries, measured when an index of an image-text model's embeddings is built and recorded in
index.json (text_queries): the recorded value is what searching open_clip's own text embeddings finds against
exact search; --text-queries FILE and none; an index of a model without a text tower records none."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from pipeline import store
from pipeline.errors import UserError
from pipeline.index import synthetic, text_recall
from pipeline.index.build import run_index
from pipeline.index.layout import read_record
from pipeline.index.options import IndexConfig
from pipeline.index.search import open_index

N = 6000


@pytest.fixture(scope="module")
def clip_vectors(clip_index, tmp_path_factory):
    """N embedding-like vectors recorded as the tiny CLIP's (its identity and text tower), in 3 shards."""
    root = tmp_path_factory.mktemp("text-recall")
    ident = store.read_metadata(store.list_shards(clip_index / "emb")[0]).identity
    x = synthetic.EmbeddingLike(dim=48, latent=48, components=300).sample(N, seed=3)
    synthetic.write_shards(root / "emb", x, shards=3, identity=ident)
    return root, x


def recall_at_10(index_dir, x: np.ndarray, queries: np.ndarray) -> float:
    """recall@10 of ``queries`` in the index (its recorded parameters) against brute force over ``x``."""
    idx = open_index(index_dir)
    found = idx.search(queries, 10).ids
    truth = np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :10]  # ids are rows in order (3 shards)
    return float(np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)]))


def test_the_recorded_text_recall_is_that_of_open_clips_text_embeddings(clip_vectors, tiny_clip):
    root, x = clip_vectors
    out = run_index(IndexConfig(str(root / "emb"), out=str(root / "ivf"), factory="IVF64,Flat", queries=200))
    rec = read_record(root / "ivf")
    tq = rec.text_queries
    assert tq["texts"] == "built-in prompts" and tq["queries"] == len(text_recall.DEFAULT_TEXTS) == 160
    assert tq["count"] == N and tq["params"] == dict(rec.search_params)
    theirs = recall_at_10(root / "ivf", x, tiny_clip.text_embeddings(list(text_recall.DEFAULT_TEXTS)))
    assert tq["recall@10"] == pytest.approx(theirs, abs=1e-3)
    assert rec.text_recall_at_10 == tq["recall@10"] and f"text queries recall@10 {tq['recall@10']:.3f}" in out["summary"]
    if tq["recall@10"] < tq["target_recall"]:  # what to pick: the parameter at which texts reach the target
        ft = tq["for_target"]
        assert ft["params"]["nprobe"] > tq["params"]["nprobe"]
        index = faiss.read_index(str(root / "ivf" / "index.faiss"))
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", ft["params"]["nprobe"])
        truth = np.argsort(-(tiny_clip.text_embeddings(list(text_recall.DEFAULT_TEXTS)) @ x.T), axis=1)[:, :10]
        found = index.search(tiny_clip.text_embeddings(list(text_recall.DEFAULT_TEXTS)), 10)[1]
        assert np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)]) == pytest.approx(
            ft["recall@10"], abs=1e-3)
    assert json.loads((root / "ivf" / "index.json").read_text())["text_queries"]["recall@10"] == tq["recall@10"]


def test_text_queries_from_a_file_or_none(clip_vectors, tmp_path):
    root, _ = clip_vectors
    texts = tmp_path / "texts.txt"
    texts.write_text("a red car\n\na photo of a cat\nsnow on a mountain\n")
    run_index(IndexConfig(str(root / "emb"), out=str(tmp_path / "a"), kind="flat", text_queries=str(texts)))
    tq = read_record(tmp_path / "a").text_queries
    assert (tq["texts"], tq["queries"], tq["recall@10"]) == (str(texts), 3, 1.0)  # flat: exact
    run_index(IndexConfig(str(root / "emb"), out=str(tmp_path / "b"), kind="flat", text_queries="none"))
    assert read_record(tmp_path / "b").text_queries is None
    assert "text_queries" not in json.loads((tmp_path / "b" / "index.json").read_text())
    with pytest.raises(UserError, match="--text-queries .*missing.txt does not exist"):
        run_index(IndexConfig(str(root / "emb"), out=str(tmp_path / "c"), text_queries=str(tmp_path / "missing.txt")))


def test_an_index_of_a_model_without_a_text_tower_records_no_text_recall(tiny_index):
    rec = read_record(tiny_index / "idx")
    assert rec.text_queries is None and rec.text_recall_at_10 is None
    assert "text_queries" not in json.loads((tiny_index / "idx" / "index.json").read_text())
