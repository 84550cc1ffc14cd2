"""Thumbnail urls stay under the service's mount prefix whatever a key holds (``/``, ``..``, spaces)."""
from __future__ import annotations

import io
from urllib.parse import urljoin, urlsplit

from PIL import Image

import tiny
from pipeline import embed
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.service import create_app
from serve_helpers import call, post_json, running
from shards import jpeg_bytes, sample_image, write_tar

KEYS = ["dir/../../etc/passwd", "a b/../c", "plain"]


def test_thumbnail_urls_of_hostile_keys_resolve_under_the_mount_prefix(tmp_path):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    shard = write_tar(tmp_path / "s.tar", [{"__key__": k, "jpg": jpeg_bytes(sample_image((40, 32), seed=i))}
                                           for i, k in enumerate(KEYS)])
    embed([str(shard)], str(tmp_path / "out"), **tiny.options())
    run_index(IndexConfig(str(tmp_path / "out"), str(tmp_path / "idx"), kind="flat"))
    child = create_app({"idx": tmp_path / "idx"})
    with running(Starlette(routes=[Mount("/similar", app=child)])) as base:
        reply = post_json(f"{base}/similar/search", {"keys": KEYS, "k": 3, "include_self": True}).json()
        thumbs = {(r["query"], r["thumb"]) for r in reply["results"]}
        thumbs |= {(h["key"], h["thumb"]) for r in reply["results"] for h in r["results"]}
        assert {k for k, _ in thumbs} == set(KEYS)
        for key, thumb in thumbs:
            resolved = urljoin(f"{base}/similar/", thumb)  # as a browser resolves it: dot segments removed
            assert urlsplit(resolved).path.startswith("/similar/thumb/idx/"), (key, thumb, resolved)
            jpeg = call(resolved)
            assert jpeg.status == 200 and Image.open(io.BytesIO(jpeg.body)).format == "JPEG", (key, jpeg)
    child.state.service.close()  # a mounted app gets no lifespan events: its owner closes it
