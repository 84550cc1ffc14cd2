"""Thumbnails from http shards under a real uvicorn server: a host that never answers costs thumbnails (504 after
``--thumb-timeout``), never searches; a host that answers gives the same image as the local shard."""
from __future__ import annotations

import functools
import http.server
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from pipeline import store
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.service import create_app

from index_data import clustered, meta
from serve_helpers import call, post_json, running

pytestmark = pytest.mark.slow  # a host that never answers: waits on timeouts: in `make test`, not in the fast subset


class Silent:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def silent():
    s = Silent()
    yield s
    s.close()


def tar_keys(shard) -> list[str]:
    with tarfile.open(shard) as tf:
        return [m.name.rsplit(".", 1)[0] for m in tf if m.name.endswith(".jpg")]


def build(tmp, remote_url: str, local_shard) -> tuple[np.ndarray, list[str], list[str]]:
    """A flat index of two embedding files: 50 rows of ``remote_url`` and the 100 rows of a real local tar."""
    x = clustered(150, 16)
    remote_keys = [f"r_{i:03d}" for i in range(50)]
    local_keys = tar_keys(local_shard)
    for name, keys, shard, rows in (("remote", remote_keys, remote_url, x[:50]),
                                    ("local", local_keys, str(local_shard), x[50:])):
        t = store.embedding_table(keys, shard, range(len(keys)), [None] * len(keys), rows, dtype="float32",
                                  metadata=meta(16))
        store.write_table(tmp / "emb" / "embeddings" / f"{name}-000000.parquet", t)
    run_index(IndexConfig(str(tmp / "emb"), out=str(tmp / "idx"), kind="flat"))
    return x, remote_keys, local_keys


def test_thumbnails_from_a_host_that_never_answers_do_not_block_searches(tmp_path, silent, digits_shards):
    x, remote_keys, local_keys = build(tmp_path, f"http://127.0.0.1:{silent.port}/remote-000000.tar",
                                       digits_shards[0])
    app = create_app([tmp_path / "idx"], threads=2, thumb_threads=2, thumb_timeout=3)
    thumbs: list[tuple[int, str, float]] = []

    def thumb(key):
        t0 = time.monotonic()
        r = call(f"{base}/thumb/idx/{key}", timeout=60)
        thumbs.append((r.status, r.body.decode(errors="replace"), time.monotonic() - t0))

    try:
        with running(app) as base:
            asking = [threading.Thread(target=thumb, args=(k,)) for k in remote_keys[:4]]  # twice the pool
            for t in asking:
                t.start()
            deadline = time.monotonic() + 10
            while len(silent.conns) < 2:  # both remote reads hold a connection the host never answers
                assert time.monotonic() < deadline, "the thumbnail reads never connected"
                time.sleep(0.01)
            # Meanwhile every search is answered at once (on the old code both pool threads were taken).
            for i in range(3):
                r = post_json(f"{base}/search", {"keys": [local_keys[i]], "k": 3}, timeout=1)
                assert r.status == 200 and len(r.json()["results"][0]["results"]) == 3, r
                r = post_json(f"{base}/search", {"vectors": [x[i].tolist()], "k": 1}, timeout=1)
                assert r.status == 200 and r.json()["results"][0]["results"][0]["key"] == remote_keys[i], r
            local = call(f"{base}/thumb/idx/{local_keys[0]}", timeout=1)  # a local shard's thumbnail too
            assert local.status == 200 and local.body[:2] == b"\xff\xd8"
            for t in asking:
                t.join(60)
            health = call(f"{base}/healthz", timeout=1)
    finally:
        silent.close()  # lets a read the old code started finish, so the server can stop
    assert len(thumbs) == 4 and {s for s, _, _ in thumbs} == {504}, thumbs
    assert all("--thumb-timeout" in body for _, body, _ in thumbs), thumbs
    assert max(took for _, _, took in thumbs) < 20, thumbs  # bounded: the timeout, queued reads twice it
    assert health.status == 200


class Shards(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_remote_shards_thumbnail_matches_the_local_one(tmp_path, digits_shards):
    from pipeline.service.remote import read_image

    root = digits_shards[0].parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Shards, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{digits_shards[0].name}"
    try:
        x, _, local_keys = build(tmp_path, url, digits_shards[0])
        with tarfile.open(digits_shards[0]) as tf:
            want = tf.extractfile(f"{local_keys[-1]}.jpg").read()
        assert read_image(url, local_keys[-1], timeout=10) == want  # the last sample: the whole shard streamed
        assert read_image(url, "no_such_key", timeout=10) is None
        assert read_image(url.replace(".tar", "-gone.tar"), local_keys[0], timeout=10) is None  # 404
        with running(create_app([tmp_path / "idx"])) as base:
            r = call(f"{base}/thumb/idx/r_000")  # the index says r_000 is in a remote shard without it
            assert r.status == 404 and "could not be read back" in r.json()["error"], r
    finally:
        server.shutdown()
        server.server_close()
