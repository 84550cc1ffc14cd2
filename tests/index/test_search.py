"""Searching: open_index API, query kinds, output formats, the CLI, bad queries, and real embeddings."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from index_data import brute_force, clustered, embedding_like, meta, write_shards
from pipeline import open_index, store
from pipeline.errors import UserError
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.query import format_result, run_search

N, DIM = 2000, 16


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return embedding_like(N, DIM, seed=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data) -> dict[str, Path]:
    """One embedding folder and a flat, an IVF and an HNSW index of it."""
    root = tmp_path_factory.mktemp("search")
    write_shards(root / "run", data, shards=2)
    out = {"emb": root / "run"}
    for kind in ("flat", "ivf", "hnsw"):
        run_index(IndexConfig(str(root / "run"), out=str(root / kind), kind=kind))
        out[kind] = root / kind
    return out


def cli():
    from pipeline.cli import cli as group

    return group


def write_vectors(path: Path, x: np.ndarray, identity: dict | None = None, keys: list[str] | None = None) -> Path:
    """Query vectors in a Parquet file; ``identity`` (fields of the model identity) records a model."""
    t = store.embedding_table(keys or [f"q{i}" for i in range(len(x))], "q.tar", range(len(x)), [None] * len(x), x,
                              dtype="float32", metadata=meta(x.shape[1], **identity) if identity else None)
    store.write_table(path, t)
    return path


def test_search_vectors_api_matches_brute_force(built, data):
    idx = open_index(built["flat"])
    assert idx.dim == DIM and idx.count == N
    q = data[:7] + 0.01
    res = idx.search(q, k=4)
    _, want = brute_force(data, q.astype(np.float32), 4)
    np.testing.assert_array_equal(res.ids, want)
    recs = res.records()
    assert len(recs) == 7 and [h["rank"] for h in recs[0]["results"]] == [1, 2, 3, 4]
    assert recs[0]["results"][0]["key"] == f"shard-000000_{want[0, 0]:05d}"
    assert recs[0]["results"][0]["shard"] == "shard-000000.tar"
    scores = [h["score"] for h in recs[0]["results"]]
    assert scores == sorted(scores, reverse=True)
    one = idx.search(q[0].astype(np.float16), k=2)  # a single float16 vector works too
    np.testing.assert_array_equal(one.ids[0], want[0, :2])


def test_keys_come_back_exactly_for_every_hit(tmp_path):
    """Keys are read back from one buffer by byte offsets: multi-byte UTF-8 and every row, not only the first."""
    x = embedding_like(300, DIM, seed=8)
    write_shards(tmp_path / "run", x, shards=2, prefix="ключ-é-🙂")
    run_index(IndexConfig(str(tmp_path / "run"), out=str(tmp_path / "idx"), kind="flat"))
    idx = open_index(tmp_path / "idx")
    res = idx.search(x[[0, 149, 150, 299]], k=3)
    want = pq.read_table(tmp_path / "idx" / "ids.parquet").column("key").to_pylist()
    assert res.ids[:, 0].tolist() == [0, 149, 150, 299]
    assert res.keys == [[want[i] for i in row] for row in res.ids]
    assert res.keys[3][0] == "ключ-é-🙂-000001_00149"
    assert res.shards[3][0] == "ключ-é-🙂-000001.tar" and res.indices[3][0] == 149


def test_search_keys_excludes_self_and_reconstructs_when_source_moved(built, tmp_path):
    for kind in ("flat", "ivf", "hnsw"):  # hnsw: an id map over the graph returns stored vectors by id too
        moved = tmp_path / kind
        shutil.copytree(built[kind], moved)
        a = open_index(built[kind]).search_keys(["shard-000001_00042"], k=5)
        b = open_index(moved, embeddings=tmp_path / "gone").search_keys(["shard-000001_00042"], k=5)
        assert "shard-000001_00042" not in [h["key"] for h in a.records()[0]["results"]]
        np.testing.assert_array_equal(a.ids, b.ids)  # vectors from FAISS reconstruct == vectors from Parquet


def test_output_formats(built):
    res = open_index(built["flat"]).search_keys(["shard-000000_00001", "shard-000001_00002"], k=3)
    table = format_result(res, "table").splitlines()
    assert table[0].split() == ["query", "rank", "key", "score", "shard"] and len(table) == 1 + 6
    assert table[1].split()[0] == "shard-000000_00001" and table[1].split()[1] == "1"
    doc = json.loads(format_result(res, "json"))
    assert [d["query"] for d in doc] == ["shard-000000_00001", "shard-000001_00002"]
    lines = format_result(res, "jsonl").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["results"][2]["rank"] == 3
    single = format_result(open_index(built["flat"]).search_keys(["shard-000000_00001"], k=2), "table").splitlines()
    assert single[0].split() == ["rank", "key", "score", "shard"]


def test_cli_index_and_search_every_query_kind(built, data, tmp_path):
    runner = CliRunner()
    cfg = tmp_path / "job.toml"
    cfg.write_text('[index]\nkind = "hnsw"\ntarget-recall = 0.9\n')
    out = tmp_path / "idx"
    r = runner.invoke(cli(), ["--config", str(cfg), "index", str(built["emb"]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "index.json").read_text())
    assert meta["factory"] == "IDMap2,HNSW32,Flat" and meta["tuning"]["target_recall"] == 0.9
    assert "built" in r.output and "efSearch=" in r.output and "recall@10" in r.output
    # by key (positional), json
    r = runner.invoke(cli(), ["search", str(out), "shard-000000_00005", "-k", "3", "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc[0]["results"]) == 3 and all(h["key"] != "shard-000000_00005" for h in doc[0]["results"])
    assert "searched" in r.stderr and "1 queries" in r.stderr
    # by --vectors, one jsonl line per query
    vec = write_vectors(tmp_path / "q.parquet", data[:5])
    r = runner.invoke(cli(), ["search", str(out), "--vectors", str(vec), "--format", "jsonl", "-k", "1"])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 5
    assert [json.loads(l_)["results"][0]["key"] for l_ in lines] == [f"shard-000000_{i:05d}" for i in range(5)]
    # by --embeddings: every item is a query; indexed ones do not find themselves
    r = runner.invoke(cli(), ["search", str(out), "--embeddings", str(built["emb"]), "--format", "jsonl", "-k", "2"])
    lines = [json.loads(l_) for l_ in r.stdout.splitlines()]
    assert r.exit_code == 0 and len(lines) == N
    assert all(rec["query"] not in [h["key"] for h in rec["results"]] for rec in lines)
    # --include-self flags it instead
    r = runner.invoke(cli(), ["search", str(out), "--key", "shard-000001_00000", "--include-self", "--params",
                              "efSearch=64", "--format", "json"])
    assert json.loads(r.stdout)[0]["results"][0] == {**json.loads(r.stdout)[0]["results"][0], "self": True}
    # table by default
    r = runner.invoke(cli(), ["search", str(out), "--key", "shard-000001_00000", "-k", "2"])
    assert r.stdout.splitlines()[0].split() == ["rank", "key", "score", "shard"]


def test_cli_parts_and_merge(built, tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    emb = str(built["emb"])
    assert runner.invoke(cli(), ["index", emb, "--out", str(out), "--kind", "ivf", "--train-only"]).exit_code == 0
    for i in range(2):
        r = runner.invoke(cli(), ["index", emb, "--out", str(out), "--parts", "2", "--part", str(i)])
        assert r.exit_code == 0 and f"part-{i:05d}-of-00002" in r.output
    r = runner.invoke(cli(), ["index-merge", str(out)])
    assert r.exit_code == 0 and f"{N} vectors" in r.output, r.output
    res = open_index(out).search_keys(["shard-000001_00001"], k=1, include_self=True)
    assert res.records()[0]["results"][0]["key"] == "shard-000001_00001"


def test_bad_queries_are_clear_errors(built, data, tmp_path):
    flat = built["flat"]
    with pytest.raises(UserError, match="not in the index .*'nope'"):
        open_index(flat).search_keys(["shard-000000_00001", "nope"])
    with pytest.raises(UserError, match="q16.parquet has dimension 8 .* dimension 16"):
        list(run_search(flat, vectors=str(write_vectors(tmp_path / "q16.parquet", clustered(3, 8)))))
    other = write_vectors(tmp_path / "other.parquet", data[:2], identity={"model": "timm:vit_small", "layer": "pool"})
    with pytest.raises(UserError, match="another model .*model: index has 'synthetic:clusters'"):
        list(run_search(flat, vectors=str(other)))
    with pytest.raises(UserError, match="exactly one kind of query"):
        list(run_search(flat))
    with pytest.raises(UserError, match="exactly one kind of query"):
        list(run_search(flat, keys=["a"], vectors=str(other)))
    with pytest.raises(UserError, match="not an embedpipe index"):
        open_index(tmp_path)
    with pytest.raises(UserError, match="no embedding shards"):
        (tmp_path / "empty").mkdir()
        list(run_search(flat, embeddings=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="does not exist"):
        list(run_search(flat, images=[str(tmp_path / "missing.jpg")]))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), bad)
    with pytest.raises(UserError, match="no 'embedding' column"):
        list(run_search(flat, vectors=str(bad)))
    r = CliRunner().invoke(cli(), ["search", str(flat), "--key", "nope"], standalone_mode=False)
    assert isinstance(r.exception, UserError)


def test_import_pipeline_stays_light():
    import subprocess
    import sys

    code = "import sys, pipeline; print('faiss' in sys.modules, 'torch' in sys.modules, callable(pipeline.open_index))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


# ------------------------------------------------------------------ real embeddings (pretrained default backbone)


@pytest.fixture(scope="module")
def real_emb(digits_shards, tmp_path_factory) -> Path:
    from pipeline.embedding.runner import embed

    out = tmp_path_factory.mktemp("real")
    embed([str(p) for p in digits_shards], out, workers=0, compile="eager", quiet=True, input_size=64,
          batch_size=100, cache_dir=str(out / "cache"))
    return out


@pytest.mark.slow
def test_real_embeddings_each_kind(real_emb, tmp_path):
    x = store.read_all(real_emb).embeddings
    meta0 = store.read_metadata(store.list_shards(real_emb)[0])
    for kind in ("flat", "ivf", "ivfpq", "hnsw", "fastscan"):
        res = run_index(IndexConfig(str(real_emb), out=str(tmp_path / kind), kind=kind, queries=100))
        meta = res["meta"]
        assert meta["embedding_meta"]["weights_sha256"] == meta0.identity.weights_sha256
        assert meta["tuning"]["recall@10"] >= 0.95, (kind, meta["tuning"])
        idx = open_index(tmp_path / kind)
        keys = store.read_all(real_emb).keys[:3]
        got = idx.search_keys(keys, k=1, include_self=True).records()
        assert [g["results"][0]["key"] for g in got] == keys
        if kind == "flat":
            _, want = brute_force(x, x[:20], 10)
            np.testing.assert_array_equal(idx.search(x[:20], 10).ids, want)


@pytest.mark.slow
def test_image_query_uses_index_model(real_emb, digits_shards, tmp_path):
    import tarfile

    run_index(IndexConfig(str(real_emb), out=str(tmp_path / "idx"), kind="flat"))
    with tarfile.open(digits_shards[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        img = tmp_path / "q.jpg"
        img.write_bytes(tar.extractfile(member).read())
        key = member.name[: -len(".jpg")]
    chunks = list(run_search(tmp_path / "idx", images=[str(img)], k=1, fmt="json"))
    assert json.loads(chunks[0])[0]["results"][0]["key"] == key


@pytest.mark.slow
def test_image_query_refuses_index_of_other_weights(real_emb, digits_shards, tmp_path):
    import tarfile

    out = tmp_path / "idx"
    run_index(IndexConfig(str(real_emb), out=str(out), kind="flat"))
    meta = json.loads((out / "index.json").read_text())
    meta["embedding_meta"]["weights_sha256"] = "0" * 64  # as if the index came from other weights
    (out / "index.json").write_text(json.dumps(meta))
    with tarfile.open(digits_shards[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "q.jpg").write_bytes(tar.extractfile(member).read())
    with pytest.raises(UserError, match="another model|differ from those that made the embeddings"):
        list(run_search(out, images=[str(tmp_path / "q.jpg")]))


def test_unnormalised_query_vectors_are_normalised_and_said(built, data, tmp_path, caplog):
    """The index holds unit vectors (cosine as inner product): a --vectors file of raw features gets scores near
    its norm, not cosines, unless it is normalised like the index's vectors (issue 26, item 6)."""
    import logging

    vec = write_vectors(tmp_path / "raw.parquet", data[:3] * 9.7)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        (chunk, _) = list(run_search(built["flat"], vectors=str(vec), k=1, fmt="json"))
    top = [q["results"][0] for q in json.loads(chunk)]
    assert [h["key"] for h in top] == [f"shard-000000_{i:05d}" for i in range(3)]
    assert all(abs(h["score"] - 1.0) < 1e-3 for h in top)
    assert any("normalised" in r.getMessage() and "9.7" in r.getMessage() for r in caplog.records)
    unit = write_vectors(tmp_path / "unit.parquet", data[:3])
    caplog.clear()
    list(run_search(built["flat"], vectors=str(unit), k=1, fmt="json"))
    assert not any("normalised" in r.getMessage() for r in caplog.records)
