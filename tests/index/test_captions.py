"""img2dataset's captions and source urls (``KEY.txt``, ``KEY.json``) shown in search, the HTML page and predict."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest

from pipeline.captions import caption_and_url, is_web_link
from pipeline.embedding.runner import embed
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.query import run_search

from shards import jpeg_bytes, sample_image, write_tar
import tiny

FAST = tiny.options()


def test_caption_and_url_rules():
    assert caption_and_url("a dog", '{"caption": "ignored", "url": "https://x/1.jpg"}') == {
        "caption": "a dog", "url": "https://x/1.jpg"}
    assert caption_and_url(None, '{"caption": "a cat"}') == {"caption": "a cat"}
    assert caption_and_url("  ", "not json") == {} and caption_and_url(None, None) == {}
    assert caption_and_url(None, '["url"]') == {}  # json that is not an object
    assert is_web_link("https://x") and is_web_link("HTTP://x") and not is_web_link("javascript:alert(1)")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """An img2dataset-like shard: image, caption and {caption, url, ...} per sample; one url is hostile."""
    tmp = tmp_path_factory.mktemp("captions")
    samples = []
    for i in range(12):
        url = "javascript:alert(1)" if i == 5 else f"https://example.com/img/{i}.jpg"
        samples.append({"__key__": f"{i:09d}", "jpg": jpeg_bytes(sample_image(seed=i)), "txt": f"picture number {i}",
                        "json": {"caption": f"picture number {i}", "url": url, "key": f"{i:09d}", "status": "success"}})
    shard = write_tar(tmp / "00000.tar", samples)
    embed([str(shard)], tmp / "emb", **FAST)
    run_index(IndexConfig(str(tmp / "emb"), out=str(tmp / "idx"), kind="flat"))
    return tmp


def test_search_shows_captions_and_urls(captioned):
    out = list(run_search(captioned / "idx", keys=["000000003"], k=12, fmt="json"))
    hits = json.loads(out[0])[0]["results"]
    assert len(hits) == 11 and all(h["caption"] == f"picture number {int(h['key'])}" for h in hits)
    assert {h["key"]: h["url"] for h in hits}["000000007"] == "https://example.com/img/7.jpg"
    table = list(run_search(captioned / "idx", keys=["000000003"], k=2))[0].splitlines()
    assert table[0].split() == ["rank", "key", "score", "shard", "caption"]
    assert table[1].endswith("picture number " + table[1].split()[1].lstrip("0"))


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.texts, self._in_text = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])
        self._in_text = tag == "span" and ("class", "text") in attrs

    def handle_data(self, data):
        if self._in_text:
            self.texts.append(data)
            self._in_text = False


def test_html_page_has_captions_and_only_web_links(captioned):
    page = captioned / "page.html"
    list(run_search(captioned / "idx", keys=["000000003"], k=11, html=str(page)))
    parsed = Links()
    parsed.feed(page.read_text())
    # the query's own caption and source link are shown too (issue 26, item 6), first on its row
    assert parsed.texts[0] == "picture number 3" and sorted(parsed.texts) == sorted(f"picture number {i}" for i in range(12))
    assert parsed.links[0] == "https://example.com/img/3.jpg"
    assert len(parsed.links) == 11 and all(u.startswith("https://example.com/img/") for u in parsed.links)


def test_predict_output_carries_caption_and_url(captioned, tmp_path):
    import numpy as np

    from pipeline.probe.predict import run_predict
    from probe_fixtures import write_shards

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)).astype("float32"), np.arange(60) % 2
    write_shards(tmp_path / "emb", x + y[:, None] * 3, y)
    from pipeline.probe.linear import run_probe
    from pipeline.probe.options import ProbeOptions

    run_probe(tmp_path / "emb", tmp_path / "probe", ProbeOptions(weight_decays=(1e-3,)))
    run_predict(tmp_path / "probe", tmp_path / "emb", tmp_path / "pred")
    t = pq.ParquetDataset(tmp_path / "pred").read()
    assert t.column_names[-2:] == ["caption", "url"] and set(t.column("url").to_pylist()) == {None}
