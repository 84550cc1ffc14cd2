"""The service over an index of two img2dataset runs that reuse keys: a row is (shard, key), answered per shard."""
from __future__ import annotations

import io
import shutil
from urllib.parse import quote, unquote

import pytest
from PIL import Image

from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.service import create_app
from serve_helpers import Figures, call, chromium, post_form, post_json, running
from two_runs import KEYS, embed_two_runs


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    runs = embed_two_runs(tmp_path_factory.mktemp("shared-serve"))
    run_index(IndexConfig(str(runs["out"]), str(runs["root"] / "index"), kind="flat"))
    with running(create_app({"runs": runs["root"] / "index"}, batch_wait_ms=20)) as base:
        yield base


def test_a_shared_key_is_answered_for_each_shard_with_thumbnails_that_name_it(url):
    r = post_json(f"{url}/search", {"keys": [KEYS[0]], "k": 2})
    assert r.status == 200, r
    results = r.json()["results"]
    assert [x["query_shard"].split("/")[-2] for x in results] == ["run1", "run2"]
    for x in results:
        assert x["thumb"] == f"/thumb/runs/{KEYS[0]}?shard={quote(x['query_shard'], safe='')}"
        assert all("?shard=" in h["thumb"] for h in x["results"])  # every key here is shared
        jpeg = call(url + x["thumb"])
        assert jpeg.status == 200 and Image.open(io.BytesIO(jpeg.body)).format == "JPEG"
    assert call(f"{url}/thumb/runs/{KEYS[0]}?shard=run1/00000.tar").body == call(url + results[0]["thumb"]).body
    assert call(f"{url}/thumb/runs/{KEYS[0]}?shard=run1/00000.tar").body != call(url + results[1]["thumb"]).body


def test_a_shard_picks_one_row_and_an_ambiguous_thumbnail_says_how(url):
    one = post_json(f"{url}/search", {"keys": [{"key": KEYS[1], "shard": "run2/00000.tar"}, KEYS[2]], "k": 2})
    assert one.status == 200, one
    got = [(x["query"], x["query_shard"].split("/")[-2]) for x in one.json()["results"]]
    assert got == [(KEYS[1], "run2"), (KEYS[2], "run1"), (KEYS[2], "run2")]
    form = post_form(f"{url}/search", [("key", KEYS[1]), ("key_shard", "run1/00000.tar"), ("k", "1")])
    assert form.status == 200 and [x["query_shard"].split("/")[-2] for x in form.json()["results"]] == ["run1"]
    ambiguous = call(f"{url}/thumb/runs/{KEYS[1]}")
    assert ambiguous.status == 400 and "?shard=" in ambiguous.json()["error"]
    missing = post_json(f"{url}/search", {"keys": [{"key": KEYS[1], "shard": "run9/00000.tar"}]})
    assert missing.status == 404 and "run9/00000.tar" in missing.json()["error"]
    bad = post_json(f"{url}/search", {"keys": [{"key": KEYS[1], "shard": 3}]})
    assert bad.status == 400


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed; the routes are tested "
                    "without the browser")
def test_the_page_shows_a_row_per_shard_of_a_shared_key_in_headless_chromium(url, tmp_path):
    dom = chromium("--dump-dom", f"{url}/?index=runs&key={KEYS[3]}&k=2", profile=tmp_path / "p").stdout
    parsed = Figures()
    parsed.feed(dom)
    assert parsed.body.get("data-state") == "done" and parsed.body.get("data-hits") == "4", dom[-2000:]
    queries = [f["src"] for f in parsed.figures][::3]  # each row: the query, then its 2 hits
    assert [q.split("?shard=")[0] for q in queries] == [f"/thumb/runs/{KEYS[3]}"] * 2
    assert {unquote(q.split("?shard=")[1]).split("/")[-2] for q in queries} == {"run1", "run2"}
    assert "run1/00000.tar)" in dom and "run2/00000.tar)" in dom
