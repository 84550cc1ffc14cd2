"""Outputs written by the release before the typed records (tests/fixtures/release-0.1.0, made by commit c935a6d)
still load, search, verify and grow; the records refuse what they do not know with an error that names it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import open_index, store
from pipeline.embedding.runner import embed
from pipeline.errors import UserError
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.record import IndexRecord
from pipeline.records import EmbeddingMeta
from pipeline.verify import run_verify
from shards import jpeg_bytes, sample_image, write_tar
import tiny

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"
# The options the fixture was embedded with (its README): the tiny model at 32 px.
OLD_OPTIONS = tiny.options(input_size=32)


@pytest.fixture
def old(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def test_old_shard_metadata_reads_as_the_typed_record(old):
    meta = store.read_metadata(old / "emb" / "embeddings" / "digits-000000.parquet")
    assert isinstance(meta, EmbeddingMeta)
    assert meta.model == "torchvision:resnet18" and meta.dim == 512 and meta.dtype == "float16"
    assert meta.identity.weights == "none" and meta.identity.preprocess["input_size"] == 32
    assert meta.precision == "fp32" and meta.compile == "eager" and meta.version == "0.1.0"
    raw = json.loads(store.pq.read_schema(old / "emb" / "embeddings" / "digits-000000.parquet").metadata[store.META_KEY])
    assert meta.to_dict() == raw  # written back, the same object: older releases read new files too


def test_old_index_opens_searches_and_verifies(old):
    idx = open_index(old / "index", embeddings=old / "emb")
    assert idx.record.factory == "Flat" and idx.count == 24 and idx.record.source_dirs == ["/tmp/prev/emb"]
    assert idx.model == store.read_metadata(old / "emb" / "embeddings" / "digits-000001.parquet").identity
    hits = idx.search_keys(["digits_000360"], k=3).records()[0]["results"]
    assert len(hits) == 3 and all(h["key"] != "digits_000360" for h in hits)
    assert json.loads((old / "index" / "index.json").read_text()) == idx.record.to_dict()
    problems, _ = run_verify(old / "emb")
    assert problems == []


def test_old_run_folder_and_index_take_new_shards(old, tmp_path):
    new = write_tar(tmp_path / "shards" / "more-000000.tar",
                    [{"__key__": f"more_{i}", "jpg": jpeg_bytes(sample_image(seed=90 + i))} for i in range(5)])
    summary = embed([str(new)], old / "emb", **OLD_OPTIONS)  # same settings as the old run.json: no conflict
    assert summary.failed == {} and summary.embedded == 5
    res = run_index(IndexConfig(str(old / "emb"), out=str(old / "index"), update=True))
    assert "added 5 vectors" in res["summary"]
    idx = open_index(old / "index")
    assert idx.count == 29 and idx.record.next_id == 29 and len(idx.record.updates) == 1
    assert idx.search_keys(["more_0"], k=1, include_self=True).records()[0]["results"][0]["key"] == "more_0"


def test_an_index_record_from_before_sources_and_reason_still_reads(old):
    raw = json.loads((old / "index" / "index.json").read_text())
    del raw["sources"], raw["reason"]
    rec = IndexRecord.from_dict(raw)
    assert rec.source_dirs == [raw["source"]] and rec.reason == ""


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(favourite_colour="blue"), "unknown field.*favourite_colour"),
    (lambda d: d.pop("dim"), "lacks dim"),
    (lambda d: d["embedding_meta"].update(shoe_size=9), "embedding_meta: unknown field.*shoe_size"),
])
def test_an_index_record_with_unknown_or_missing_fields_is_refused_by_name(old, change, message):
    path = old / "index" / "index.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message):
        open_index(old / "index")


def test_shard_metadata_with_an_unknown_field_is_refused_by_name(tmp_path):
    meta = {**store.read_metadata(FIXTURE / "emb" / "embeddings" / "digits-000000.parquet").to_dict(), "extra": 1}
    table = store.embedding_table(["a"], "s.tar", [0], [None], np.zeros((1, 512), np.float32))
    table = table.replace_schema_metadata({store.META_KEY: json.dumps(meta)})
    store.write_table(tmp_path / "x.parquet", table)
    with pytest.raises(UserError, match=r"x.parquet: embedding metadata: unknown field\(s\) extra"):
        store.shard_info(tmp_path / "x.parquet")
