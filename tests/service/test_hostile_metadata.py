"""A poisoned ``.json`` sidecar (issue 24, item 3): nested 100,000 levels deep, it was embedded, indexed and
passed by verify, then broke every search whose results held it (a 500 RecursionError in serve, a traceback in
`embedpipe search`). Kept fields are now bounded where embed stores them and wherever they are parsed."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.captions import MAX_FIELD_CHARS, caption_and_url, parse_json
from pipeline.cli import cli
from pipeline.probe.labels import LabelSource
from pipeline.service import create_app
from pipeline.verify import run_verify
from serve_helpers import post_json, running
from shards import jpeg_bytes, sample_image, write_tar
import tiny

DEPTH = 100_000
DEEP_JSON = '{"url": ' * DEPTH + '"https://example.com/deep.jpg"' + "}" * DEPTH  # "url" at every level


def image(i: int) -> bytes:
    return jpeg_bytes(sample_image((56, 44), seed=500 + i))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_meta")
    shard = write_tar(root / "meta.tar", [
        {"__key__": "good_0", "jpg": image(0), "json": {"caption": "a good one", "url": "https://example.com/0.jpg"}},
        {"__key__": "deep", "jpg": image(1), "json": DEEP_JSON},
        {"__key__": "long", "jpg": image(2), "txt": "word " * 30_000},
        {"__key__": "good_1", "jpg": image(3), "txt": "another good one"}])
    runner = CliRunner()
    r = runner.invoke(cli, ["embed", str(shard), "--out", str(root / "emb"), *tiny.cli_args(out_dtype="float32")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["index", str(root / "emb"), "--out", str(root / "idx"), "--kind", "flat"])
    assert r.exit_code == 0, r.output
    return root


def test_hostile_fields_are_stored_bounded_with_a_warning(indexed):
    rec = json.loads((indexed / "emb" / "_state" / "meta.json").read_text())
    assert rec["embedded"] == 4 and rec["skipped"] == []
    warnings = {w["key"]: w["reason"] for w in rec["warnings"]}
    assert set(warnings) == {"deep", "long"}
    assert warnings["deep"] == (f"json is {len(DEEP_JSON)} characters long, above the limit of {MAX_FIELD_CHARS}; "
                                f"stored cut to its first {MAX_FIELD_CHARS}; json is nested 8192 levels deep, above "
                                "the limit of 64; stored as text, never parsed (no caption or url read from it)")
    assert warnings["long"].startswith("txt is 150000 characters long")
    t = pq.read_table(indexed / "emb" / "embeddings" / "meta.parquet").to_pydict()
    row = dict(zip(t["key"], zip(t["txt"], t["json"])))
    assert row["deep"][1] == DEEP_JSON[:MAX_FIELD_CHARS] and len(row["long"][0]) == MAX_FIELD_CHARS
    assert run_verify(indexed / "emb")[0] == []


def test_search_whose_results_hold_it_answers_in_the_cli(indexed):
    runner = CliRunner()
    for args in (["good_0", "-k", "3", "--format", "json"], ["--key", "deep", "-k", "3", "--include-self",
                                                               "--format", "json"]):
        r = runner.invoke(cli, ["search", str(indexed / "idx"), *args])
        assert r.exit_code == 0 and r.exception is None, r.output
        (answer,) = json.loads(r.stdout)
        hits = {h["key"]: h for h in answer["results"]}
        assert "deep" in hits and "caption" not in hits["deep"] and "url" not in hits["deep"]
        assert hits.get("good_0", {"caption": "a good one"})["caption"] == "a good one"
    r = runner.invoke(cli, ["search", str(indexed / "idx"), "good_1", "-k", "3"])  # the table, with captions
    assert r.exit_code == 0 and "deep" in r.stdout and "another good one" not in r.stdout, r.output


def test_search_whose_results_hold_it_answers_in_the_service(indexed):
    emb = pq.read_table(indexed / "emb" / "embeddings" / "meta.parquet")
    deep_vector = np.asarray(emb.column("embedding").to_pylist()[emb.column("key").to_pylist().index("deep")])
    with running(create_app({"meta": indexed / "idx"})) as base:
        for body in ({"keys": ["good_0"]}, {"keys": ["deep"]}, {"vectors": [deep_vector.tolist()]}):
            r = post_json(f"{base}/search", {"index": "meta", "k": 3, "include_self": True, **body})
            assert r.status == 200, r
            hits = {h["key"]: h for h in r.json()["results"][0]["results"]}
            assert "deep" in hits and "url" not in hits["deep"], hits
            assert hits.get("good_0", {"url": "https://example.com/0.jpg"})["url"] == "https://example.com/0.jpg"


def test_a_deep_json_stored_before_the_bound_is_never_parsed():
    """Folders embedded before the bound hold the whole text: each reader of it parses through the bound."""
    assert caption_and_url("a caption", DEEP_JSON) == {"caption": "a caption"}
    assert parse_json(DEEP_JSON) is None and parse_json(DEEP_JSON.encode()) is None
    assert LabelSource.make(field="url").value({"json": [DEEP_JSON]}, 0) is None
    shallow = '{"url": ' * 60 + '"https://example.com/ok.jpg"' + "}" * 60
    assert caption_and_url(None, shallow) == {}  # parsed (60 levels): its top "url" is no string
    assert parse_json('{"a": [[["x"]]]}') == {"a": [[["x"]]]}
