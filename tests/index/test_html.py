"""search --html: a page with the query and neighbour images read back from the shards."""
import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pipeline.index.query import run_search



class Figures(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.captions, self._in_caption = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_caption = tag == "figcaption"

    def handle_data(self, data):
        if self._in_caption:
            self.captions.append(data)
            self._in_caption = False


@pytest.fixture(scope="module")
def page(tiny_index, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    out = list(run_search(tiny_index / "idx", keys=["digits_000360", "digits_001773"], k=4,
                          html=str(tmp / "page.html")))
    return tmp / "page.html", out


def test_page_shows_query_and_neighbour_images(page):
    path, out = page
    parser = Figures()
    parser.feed(path.read_text())
    assert len(parser.images) == 2 * (1 + 4)  # every query and neighbour image was found in the shards
    for src in parser.images:
        assert src.startswith("data:image/jpeg;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "JPEG" and max(img.size) <= 160
    assert parser.captions[0] == "query: digits_000360"
    assert parser.captions[1].startswith("#1 digits_") and "·" in parser.captions[1]
    assert "digits_000360" in out[0]


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed; the HTML is parsed instead")
def test_page_renders_in_headless_chromium(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}/p",
                    f"--screenshot={shot}", "--window-size=1000,600", path.as_uri()], check=True, timeout=60,
                   capture_output=True)
    im = Image.open(shot).convert("L")
    dark = int((np.asarray(im) < 100).sum())
    assert dark > 2000  # the digit thumbnails (dark ink) are drawn, not just an empty page
