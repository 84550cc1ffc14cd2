"""Text queries in `embedpipe serve`: POST /search {"texts": [...]} (and multipart text fields) answers with the
neighbours exact search over open_clip's own text embedding finds, text queries that arrive together share
text-tower calls, an index whose model has no text tower is a 400 naming the model, and the page's text box."""
from __future__ import annotations

import re
import shutil
import threading

import pytest

from pipeline.service import create_app

from serve_helpers import Figures, call, chromium, post_form, post_json, running

TEXTS = ["a red car", "a photo of the digit seven", "two dogs on a beach", "an empty street at night"]


@pytest.fixture(scope="module")
def url(clip_index, tiny_index, tiny_clip):
    # the index names a checkpoint file: the operator trusts it (as for image queries), here explicitly
    with running(create_app({"clip": clip_index / "idx", "digits": tiny_index / "idx"}, batch_wait_ms=20,
                            trust_models=[str(tiny_clip.weights)])) as base:
        yield base


def test_indexes_say_which_take_texts(url):
    info = {i["name"]: i for i in call(f"{url}/indexes").json()["indexes"]}
    assert info["clip"]["texts"] is True and info["digits"]["texts"] is False
    assert info["clip"]["model"] == "open_clip:Tiny-CLIP-Test" and info["clip"]["dim"] == 48


def test_text_queries_find_the_exact_neighbours(url, clip_index, tiny_clip):
    r = post_json(f"{url}/search", {"index": "clip", "texts": TEXTS[:2], "k": 5})
    assert r.status == 200, r
    answer = r.json()
    assert answer["kind"] == "texts" and [q["query"] for q in answer["results"]] == TEXTS[:2]
    got = [[h["key"] for h in q["results"]] for q in answer["results"]]
    assert got == tiny_clip.exact_neighbours(clip_index / "emb", TEXTS[:2], 5)
    hit = answer["results"][0]["results"][0]
    assert hit["thumb"] == f"/thumb/clip/{hit['key']}" and call(f"{url}{hit['thumb']}").status == 200

    form = post_form(f"{url}/search", [("index", "clip"), ("k", "5"), ("text", TEXTS[1])])
    assert form.status == 200 and [h["key"] for h in form.json()["results"][0]["results"]] == got[1]


def test_text_queries_arriving_together_share_text_tower_calls(clip_index, tiny_clip):
    texts = [f"a photo of the number {i}" for i in range(12)]
    with running(create_app({"clip": clip_index / "idx"}, batch_wait_ms=300, max_batch=64,
                            trust_models=[str(tiny_clip.weights)])) as base:
        post_json(f"{base}/search", {"texts": ["warm up"]})  # builds the text tower
        replies = [None] * len(texts)

        def ask(i):
            replies[i] = post_json(f"{base}/search", {"texts": [texts[i]], "k": 3})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = call(f"{base}/healthz").json()["text_queries"]
    expected = tiny_clip.exact_neighbours(clip_index / "emb", texts, 3)
    assert [[h["key"] for h in r.json()["results"][0]["results"]] for r in replies] == expected  # each its own
    assert stats["texts"] == 13 and stats["batches"] < 13 and stats["mean_batch"] > 1.5, stats


def test_bad_text_queries_and_models_without_a_text_tower_are_4xx(url):
    r = post_json(f"{url}/search", {"index": "digits", "texts": ["a red car"]})
    assert r.status == 400 and "the model torchvision:resnet18 has no text tower" in r.json()["error"], r
    assert "open_clip:" in r.json()["error"]
    r = post_json(f"{url}/search", {"index": "nope", "texts": ["a red car"]})
    assert r.status == 404 and "nope" in r.json()["error"], r
    for body, says in [({"index": "clip", "texts": [" "]}, "non-empty strings"),
                       ({"index": "clip", "texts": [3]}, "non-empty string or a list"),
                       ({"index": "clip", "texts": ["x" * 5000]}, "at most 4096"),
                       ({"index": "clip", "texts": ["a"], "keys": ["k"]}, "exactly one kind of query")]:
        r = post_json(f"{url}/search", body)
        assert r.status == 400 and says in r.json()["error"], (body, r)
    assert call(f"{url}/healthz").status == 200


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed; the routes are tested "
                    "without the browser")
def test_page_text_box_shows_neighbours_in_headless_chromium(url, tmp_path, clip_index, tiny_clip):
    dom = chromium("--dump-dom", f"{url}/?index=clip&text=a%20red%20car&k=4", profile=tmp_path / "p").stdout
    parsed = Figures()
    parsed.feed(dom)
    assert parsed.body.get("data-state") == "done" and parsed.body.get("data-hits") == "4", dom[-2000:]
    assert '<div class="text-query">a red car</div>' in dom
    keys = re.findall(r"#\d (digits_\d+)</div>", dom)
    assert keys == tiny_clip.exact_neighbours(clip_index / "emb", ["a red car"], 4)[0]
    assert [f["src"] for f in parsed.figures] == [f"/thumb/clip/{k}" for k in keys]


def test_text_queries_need_the_operators_trust_of_a_model_file_the_index_names(clip_index):
    with running(create_app({"clip": clip_index / "idx"})) as base:
        r = post_json(f"{base}/search", {"texts": ["a red car"], "k": 2})
        assert r.status == 403 and "--trust-model" in r.json()["error"], r
        assert post_json(f"{base}/search", {"keys": ["digits_000360"], "k": 2}).status == 200  # keys still work
