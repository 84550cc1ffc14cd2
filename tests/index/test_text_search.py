"""Search by text: `embedpipe search IDX --text` (and --texts-file, --html), `Index.search_texts`, each answering
with the neighbours exact search over open_clip's own text embedding finds; an index whose model has no text
tower refused with exit 2 naming the model."""
from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from pipeline import open_index
from pipeline.errors import UserError

pytestmark = pytest.mark.slow  # CLIP towers and CLI runs: in `make test`, not in the fast subset

TEXTS = ["a red car", "a photo of the digit seven", "two dogs on a beach"]
K = 5


def embedpipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def exact_neighbours(clip_index, tiny_clip, texts: list[str], k: int = K) -> list[list[str]]:
    return tiny_clip.exact_neighbours(clip_index / "emb", texts, k)


def test_search_texts_in_the_api_finds_the_exact_neighbours(clip_index, tiny_clip):
    idx = open_index(clip_index / "idx")
    res = idx.search_texts(TEXTS, k=K)
    assert res.queries == TEXTS and res.keys == exact_neighbours(clip_index, tiny_clip, TEXTS)
    assert len({tuple(r) for r in res.keys}) > 1  # the texts have different neighbours: the check can fail
    assert idx.search_texts(TEXTS[:1], k=K).keys[0] == res.keys[0]  # the tower is kept for later queries


def test_search_text_on_the_cli(clip_index, tiny_clip, tmp_path):
    r = embedpipe("search", clip_index / "idx", "--text", TEXTS[0], "--text", TEXTS[1], "-k", K, "--format", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [g["query"] for g in got] == TEXTS[:2]
    assert [[h["key"] for h in g["results"]] for g in got] == exact_neighbours(clip_index, tiny_clip, TEXTS[:2])
    assert "searched " in r.stderr and ": 2 queries, k=5" in r.stderr

    queries = tmp_path / "queries.txt"
    queries.write_text(f"{TEXTS[2]}\n\n{TEXTS[0]}\n")  # one per line, blank lines skipped
    page = tmp_path / "page.html"
    r = embedpipe("search", clip_index / "idx", "--texts-file", queries, "-k", K, "--format", "jsonl", "--html", page)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [[h["key"] for h in g["results"]] for g in got] == exact_neighbours(clip_index, tiny_clip,
                                                                               [TEXTS[2], TEXTS[0]])

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.boxes, self.images, self.in_box = [], 0, False

        def handle_starttag(self, tag, attrs):
            self.in_box = tag == "div" and ("class", "text-query") in attrs
            self.images += tag == "img"

        def handle_data(self, data):
            if self.in_box:
                self.boxes.append(data)
                self.in_box = False

    parsed = Page()
    parsed.feed(page.read_text())
    assert parsed.boxes == [TEXTS[2], TEXTS[0]] and parsed.images == 2 * K  # each neighbour's thumbnail


def test_text_queries_that_are_not_are_refused(clip_index):
    r = embedpipe("search", clip_index / "idx", "--text", "  ")
    assert r.returncode == 2 and "--text takes a non-empty query" in r.stderr
    r = embedpipe("search", clip_index / "idx", "--text", "a car", "--key", "digits_000360")
    assert r.returncode == 2 and "give exactly one kind of query" in r.stderr
    r = embedpipe("search", clip_index / "idx", "--texts-file", clip_index / "nothing.txt")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_an_index_without_a_text_tower_is_refused_naming_its_model(tiny_index):
    r = embedpipe("search", tiny_index / "idx", "--text", "a red car")
    assert r.returncode == 2, r.stderr
    assert "error: the model torchvision:resnet18 has no text tower" in r.stderr and "open_clip:" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(UserError, match="the model torchvision:resnet18 has no text tower"):
        open_index(tiny_index / "idx").search_texts(["a red car"])
