"""`embedpipe serve`: a real uvicorn server on a free loopback port, real HTTP, a real FAISS index of real JPEGs."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline import store
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.search import open_index
from pipeline.service import create_app

from serve_helpers import Figures, call, chromium, post_form, post_json, running

KEY = "digits_000360"  # the first sample of digits-000000.tar


def jpeg_of(shard: Path, key: str) -> bytes:
    with tarfile.open(shard) as tf:
        return tf.extractfile(f"{key}.jpg").read()


def keys_of(parquet: Path) -> list[str]:
    return store.read_all(parquet.parent.parent, files=[parquet]).keys


@pytest.fixture(scope="module")
def data(digits_shards, tiny_index, tmp_path_factory):
    """Two shards embedded (tiny model) and indexed: ``idx``; and ``idx0`` holding only the first of them."""
    tmp = tmp_path_factory.mktemp("serve")
    files = store.list_shards(tiny_index / "emb")
    (tmp / "emb0" / "embeddings").mkdir(parents=True)
    shutil.copy(files[0], tmp / "emb0" / "embeddings" / files[0].name)
    run_index(IndexConfig(str(tmp / "emb0"), out=str(tmp / "idx0"), kind="flat"))
    return SimpleNamespace(tmp=tmp, shards=digits_shards, files=files, idx=tiny_index / "idx", idx0=tmp / "idx0")


@pytest.fixture(scope="module")
def url(data):
    with running(create_app({"digits": data.idx}, batch_wait_ms=20, max_body_mb=1)) as base:
        yield base


def search(url, **body):
    r = post_json(f"{url}/search", body)
    assert r.status == 200, r
    return r.json()


def test_health_and_indexes(url):
    h = call(f"{url}/healthz").json()
    assert h["status"] == "ok" and h["indexes"] == {"digits": {"generation": 1, "count": 200}}
    (info,) = call(f"{url}/indexes").json()["indexes"]
    assert info["name"] == "digits" and info["count"] == 200 and info["dim"] == 512 and info["kind"] == "flat"
    assert info["model"] == "torchvision:resnet18" and info["recall@10"] == 1.0 and info["images"] is True
    assert "path" not in info and str(url) not in json.dumps(info)


def test_search_by_key_vector_and_image_agree(url, data):
    by_key = search(url, keys=[KEY], k=4)["results"][0]
    assert by_key["query"] == KEY and len(by_key["results"]) == 4 and by_key["thumb"] == f"/thumb/digits/{KEY}"
    assert KEY not in [h["key"] for h in by_key["results"]]  # the item itself is excluded
    hit = by_key["results"][0]
    assert set(hit) >= {"rank", "key", "score", "shard", "index", "id", "thumb"} and hit["rank"] == 1
    assert hit["shard"].endswith(".tar") and hit["thumb"] == f"/thumb/digits/{hit['key']}"

    idx = open_index(data.idx)
    vec = idx.vectors(idx.lookup([KEY]))[0]
    by_vector = search(url, vectors=[vec.tolist()], k=5)["results"][0]["results"]
    assert by_vector[0]["key"] == KEY and by_vector[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [h["key"] for h in by_vector[1:]] == [h["key"] for h in by_key["results"]]

    jpeg = jpeg_of(data.shards[0], KEY)
    by_upload = post_form(f"{url}/search", [("k", "5"), ("image", ("seven.jpg", jpeg))])
    assert by_upload.status == 200, by_upload
    res = by_upload.json()["results"][0]
    assert res["query"] == "seven.jpg" and res["results"][0]["key"] == KEY  # the same image, embedded again
    by_b64 = search(url, images=[{"name": "q", "data": base64.b64encode(jpeg).decode()}], k=5)["results"][0]
    assert [h["key"] for h in by_b64["results"]] == [h["key"] for h in res["results"]]
    data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert search(url, images=[data_uri], k=1)["results"][0]["results"][0]["key"] == KEY


def test_shard_filter_keeps_only_that_shard(url, data):
    other = data.shards[1].name
    res = search(url, keys=[KEY], k=6, filter={"shard": [other]})["results"][0]["results"]
    assert len(res) == 6 and {Path(h["shard"]).name for h in res} == {other}
    assert [h["rank"] for h in res] == [1, 2, 3, 4, 5, 6]


def test_thumbnails_are_read_back_from_the_shards(url, data):
    for key in [KEY, keys_of(data.files[1])[7]]:
        r = call(f"{url}/thumb/digits/{key}")
        assert r.status == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.body))
        assert im.format == "JPEG" and max(im.size) <= 160
        # The thumbnail shows the stored image: it matches that image, scaled, far better than another one.
        want = np.asarray(Image.open(io.BytesIO(jpeg_of(data.shards[0], KEY))).convert("L").resize(im.size), float)
        err = np.abs(np.asarray(im.convert("L"), float) - want).mean()
        assert (err < 12) == (key == KEY), (key, err)
    r = call(f"{url}/thumb/digits/..%2F..%2Fetc%2Fpasswd")
    assert r.status == 404 and "no key" in r.json()["error"]


def test_image_queries_arriving_together_share_model_calls(data, caplog):
    jpegs = [jpeg_of(data.shards[0], k) for k in keys_of(data.files[0])[:12]]
    with running(create_app({"digits": data.idx}, batch_wait_ms=300, max_batch=64)) as base:
        with caplog.at_level(logging.INFO, logger="pipeline.service"):
            post_form(f"{base}/search", [("image", ("warm.jpg", jpegs[0]))])  # builds the model
        built = [r for r in caplog.records if "building the image model" in r.getMessage()]
        assert [r.levelno for r in built] == [logging.INFO]  # news, not a warning (issue 26, item 6)
        replies = [None] * len(jpegs)

        def ask(i):
            replies[i] = post_form(f"{base}/search", [("k", "1"), ("image", (f"{i}.jpg", jpegs[i]))])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jpegs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = call(f"{base}/healthz").json()["image_queries"]
    keys = keys_of(data.files[0])[:12]
    assert [r.json()["results"][0]["results"][0]["key"] for r in replies] == keys  # each got its own answer
    assert stats["images"] == 13 and stats["batches"] < 13 and stats["mean_batch"] > 1.5, stats


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (the decompression bomb shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"keys": [KEY], "kk": 3}).encode(), 400, "unknown field(s) ['kk']"),
    (json.dumps({"k": 3}).encode(), 400, "exactly one kind of query"),
    (json.dumps({"keys": [KEY], "vectors": [[0.0]]}).encode(), 400, "exactly one kind of query"),
    (json.dumps({"keys": [KEY], "k": 0}).encode(), 400, "k must be an integer in 1..1000"),
    (json.dumps({"keys": [KEY], "k": "ten"}).encode(), 400, "k must be an integer"),
    (json.dumps({"keys": [KEY], "k": 10 ** 6}).encode(), 400, "k must be an integer in 1..1000"),
    (json.dumps({"keys": ["no-such-key"]}).encode(), 404, "not in the index digits"),
    (json.dumps({"keys": [KEY], "index": "nope"}).encode(), 404, "no index named 'nope'"),
    (json.dumps({"vectors": [[0.5] * 7]}).encode(), 400, "dimension 7 but the index digits holds dimension 512"),
    (json.dumps({"vectors": [[1.0, "x"]]}).encode(), 400, "lists of numbers"),
    (b'{"vectors": [[NaN, 1.0]]}', 400, "NaN or infinite"),
    (json.dumps({"images": ["%%% not base64"]}).encode(), 400, "not valid base64"),
    (json.dumps({"images": [base64.b64encode(b"hello, not an image").decode()]}).encode(), 400,
     "cannot use image images[0]: not a decodable image"),
    (json.dumps({"images": [base64.b64encode(png_bomb(60000, 60000)).decode()]}).encode(), 400,
     "decompression bomb refused"),
    (json.dumps({"images": [base64.b64encode(png_bomb(12000, 9000)).decode()]}).encode(), 400,
     "above the limit of 100000000 (--max-pixels)"),
    (json.dumps({"keys": [KEY] * 65}).encode(), 413, "at most 64 (--max-queries)"),
    (json.dumps({"keys": [KEY], "filter": {"label": 3}}).encode(), 400, "filter takes"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb this test sends, refused
def test_bad_requests_get_a_4xx_json_error_that_says_why(url, body, status, message):
    r = call(f"{url}/search", "POST", body, {"content-type": "application/json"})
    assert r.status == status, r
    assert message in r.json()["error"] and "Traceback" not in r.body.decode()


def test_oversized_malformed_and_misrouted_requests(url, data):
    big = b"x" * (2 << 20)  # the fixture's server takes at most 1 MiB
    r = call(f"{url}/search", "POST", big, {"content-type": "application/json"})
    assert r.status == 413 and "larger than 1048576 bytes" in r.json()["error"]
    r = call(f"{url}/search", "POST", big, {"content-type": "application/json"}, chunked=True)  # no Content-Length
    assert r.status == 413 and "--max-body-mb" in r.json()["error"]
    r = call(f"{url}/search", "POST", b"keys=a", {"content-type": "application/x-www-form-urlencoded"})
    assert r.status == 415 and "application/json or multipart/form-data" in r.json()["error"]
    r = call(f"{url}/search", "POST", b"--x\r\ngarbage", {"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status < 500 and "error" in r.json()
    r = post_form(f"{url}/search", [("image", ("a.jpg", jpeg_of(data.shards[0], KEY))), ("path", "/etc/passwd")])
    assert r.status == 400 and "unknown form field(s) ['path']" in r.json()["error"]
    assert call(f"{url}/search").status == 405
    r = call(f"{url}/no/such/route")
    assert r.status == 404 and r.json() == {"error": "Not Found"}


def test_an_internal_error_is_a_500_without_traceback(data, monkeypatch):
    app = create_app({"digits": data.idx})
    served = app.state.service.catalog.current["digits"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /srv/data")

    monkeypatch.setattr(served.index, "search", broken)
    with running(app) as base:
        r = post_json(f"{base}/search", {"keys": [KEY]})
        assert call(f"{base}/healthz").status == 200  # the service goes on
    assert r.status == 500 and r.json() == {"error": "internal error (RuntimeError); the service log has the details"}


def test_the_token_guards_every_route(data):
    token = "t0ken-for-tests"
    ok = {"authorization": f"Bearer {token}"}
    with running(create_app({"digits": data.idx}, token=token)) as base:
        for path in ["/", "/healthz", "/indexes", f"/thumb/digits/{KEY}", "/no/such/route"]:
            for headers in [{}, {"authorization": "Bearer wrong-token"}, {"authorization": token}]:
                r = call(base + path, headers=headers)
                assert r.status == 401 and "Authorization: Bearer" in r.json()["error"], (path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer")
        assert post_json(f"{base}/search", {"keys": [KEY]}).status == 401
        assert post_json(f"{base}/search", {"keys": [KEY]}, ok).status == 200
        for path in ["/", "/healthz", "/indexes", f"/thumb/digits/{KEY}"]:
            assert call(base + path, headers=ok).status == 200, path
        # The page trades ?token= for a cookie once, and drops it from the address.
        r = call(f"{base}/?token={token}&key={KEY}")
        assert r.status == 303 and r.headers["location"] == f"/?key={KEY}"
        cookie = r.headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        assert call(f"{base}/thumb/digits/{KEY}", headers={"cookie": cookie}).status == 200
        assert call(f"{base}/?token=wrong-token").status == 401
    with running(create_app({"digits": data.idx})) as base:  # no token: open (on loopback)
        assert call(f"{base}/indexes").status == 200


def test_mounted_under_another_app(data):
    from starlette.applications import Starlette
    from starlette.routing import Mount

    child = create_app({"digits": data.idx}, token="mounted-token")
    parent = Starlette(routes=[Mount("/similar", app=child)])
    with running(parent) as base:
        assert call(f"{base}/similar/indexes").status == 401
        login = call(f"{base}/similar/?token=mounted-token")
        assert login.status == 303 and login.headers["location"] == "/similar/"
        assert "Path=/similar;" in login.headers["set-cookie"] + ";"
        ok = {"cookie": login.headers["set-cookie"].split(";")[0]}
        assert call(f"{base}/similar/indexes", headers=ok).json()["indexes"][0]["name"] == "digits"
        hit = post_json(f"{base}/similar/search", {"keys": [KEY], "k": 1}, ok).json()["results"][0]["results"][0]
        assert hit["thumb"].startswith("/similar/thumb/digits/")
        assert call(base + hit["thumb"], headers=ok).headers["content-type"] == "image/jpeg"
        assert b"embedpipe search" in call(f"{base}/similar/", headers=ok).body
    child.state.service.close()  # a mounted app gets no lifespan events: its owner closes it


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed; the routes are tested "
                    "without the browser")
def test_page_shows_neighbours_in_headless_chromium(url, tmp_path):
    page = f"{url}/?index=digits&key={KEY}&k=4"
    dom = chromium("--dump-dom", page, profile=tmp_path / "p1").stdout
    parsed = Figures()
    parsed.feed(dom)
    assert parsed.body.get("data-state") == "done" and parsed.body.get("data-hits") == "4", dom[-2000:]
    srcs = [f["src"] for f in parsed.figures]
    assert srcs[0] == f"/thumb/digits/{KEY}" and len(srcs) == 5 and all(s.startswith("/thumb/digits/") for s in srcs)
    assert re.search(r"#1 digits_\d+</div><div>score 0\.\d{3}</div>", dom)
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1000,600", page, profile=tmp_path / "p2")
    dark = int((np.asarray(Image.open(shot).convert("L")) < 100).sum())
    assert dark > 2000  # the digit thumbnails (dark ink) are drawn, not only the form and the captions


def test_hot_reload_during_queries_fails_none(data):
    """Queries run while `embedpipe index --update` adds a shard: every one succeeds, and the new keys appear."""
    new_file = data.files[1]
    new_key = keys_of(new_file)[3]
    replies, stop = [], threading.Event()
    with running(create_app({"digits": data.idx0}, reload_every=0.1)) as base:
        assert post_json(f"{base}/search", {"keys": [new_key]}).status == 404

        def load():
            while not stop.is_set():
                r = post_json(f"{base}/search", {"keys": [KEY], "k": 3})
                replies.append((r.status, r.json().get("generation")))
                replies.append((call(f"{base}/thumb/digits/{KEY}").status, None))

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        emb0 = data.tmp / "emb0" / "embeddings"
        shutil.copy(new_file, emb0 / f".{new_file.name}.tmp")
        os.replace(emb0 / f".{new_file.name}.tmp", emb0 / new_file.name)
        out = subprocess.run([sys.executable, "-m", "pipeline", "index", str(data.tmp / "emb0"), "--out",
                              str(data.idx0), "--update"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 30
        while post_json(f"{base}/search", {"keys": [new_key]}).status != 200:
            assert time.monotonic() < deadline, "the updated index was not picked up"
            time.sleep(0.1)
        time.sleep(0.3)  # a few more queries against the new version
        stop.set()
        for t in threads:
            t.join(30)
        health = call(f"{base}/healthz").json()
    assert len(replies) > 20 and {status for status, _ in replies} == {200}, sorted(set(replies))
    assert {g for _, g in replies if g} == {1, 2}  # queries were answered before and after the swap
    assert health["indexes"]["digits"] == {"generation": 2, "count": 200} and health["reloads"] == 1


def test_cli_serves_with_workers_until_terminated(data):
    env = {**os.environ, "EMBEDPIPE_SERVE_TOKEN": "cli-token-123"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", f"d={data.idx}", "--port", "0", "--workers", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "embedpipe serve exited before serving"
        base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert call(f"{base}/healthz").status == 401
        ok = {"authorization": "Bearer cli-token-123"}
        for _ in range(4):  # two worker processes share the port; each holds the index
            assert call(f"{base}/indexes", headers=ok).json()["indexes"][0]["name"] == "d"
            assert post_json(f"{base}/search", {"keys": [KEY], "k": 2}, ok).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        rest = proc.stderr.read()
    # The workers' supervisor stops them gracefully and exits 0 (one process alone re-raises SIGTERM, as uvicorn does).
    assert code == 0 and "Traceback" not in rest, rest


@pytest.mark.parametrize("args, message", [
    (["/no/such/index"], "/no/such/index is not an embedpipe index"),
    (["IDX", "--token", "short"], "--token must be at least 8 characters"),
    (["a=IDX", "a=IDX"], "two indexes are named 'a'"),
    (["IDX", "--port", "70000"], "--port 70000 must be in 0..65535"),
    (["IDX", "--header-timeout", "0"], "--header-timeout 0.0 must be positive"),
    (["IDX", "--max-concurrent", "0"], "--max-concurrent 0 must be positive"),
])
def test_cli_refuses_bad_arguments_before_listening(data, args, message, capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", *[a.replace("IDX", str(data.idx)) for a in args]])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_json_searches_arriving_together_are_searched_as_one_batch(data, monkeypatch):
    """Requests queued while the pool is busy go in one batch: the same answers as alone, errors their own."""
    import asyncio

    from pipeline.service import app as service_app

    batched = []  # the rows of each group answered by one search

    def counted(served, qs, root=""):
        out = answer_together(served, qs, root)
        batched.append(len(qs))
        return out

    answer_together = service_app.answer_together
    monkeypatch.setattr(service_app, "answer_together", counted)
    app = create_app({"digits": data.idx}, threads=2)
    svc = app.state.service
    x = open_index(data.idx).vectors(np.arange(3))
    bodies = ([{"keys": [k], "k": 3} for k in keys_of(data.files[0])[:5]] + [{"keys": [KEY], "k": 2}]
              + [{"vectors": [v.tolist()], "k": 3} for v in x]
              + [{"keys": ["no-such-key"], "k": 4}, {"keys": [KEY], "k": 4}, {"vectors": [[0.5, 0.5]], "k": 5},
                 {"keys": 7}])
    bodies = [json.dumps(b).encode() for b in bodies]

    def plain(answer):
        out = json.loads(answer)
        out.pop("took_ms")
        return out

    async def ask(body):
        try:
            return plain(await svc.search_json(body, "", time.perf_counter()))
        except Exception as e:  # the error this request alone gets
            return type(e).__name__, str(e)

    async def together():
        gate = threading.Event()
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(svc.pool, gate.wait) for _ in range(2)]  # both pool threads taken
        answers = [asyncio.ensure_future(ask(b)) for b in bodies]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*busy)
        return await asyncio.gather(*answers)

    try:
        alone = [asyncio.run(ask(b)) for b in bodies]
        before = svc.search_stats()
        got = asyncio.run(together())
        after = svc.search_stats()
    finally:
        svc.close()
    assert got == alone
    assert [type(a) for a in got[:9]] + [type(got[10])] == [dict] * 10
    assert all(a["results"][0]["results"][0]["key"] != a["results"][0]["query"] for a in got[:6])  # self excluded
    assert got[9][0] == "NotFound" and "no-such-key" in got[9][1]
    assert got[11][0] == "UserError" and "dimension" in got[11][1].lower()
    assert got[12][0] == "HTTPException"
    # 13 requests: the first two start a batch each (one per pool thread), the other eleven queue and go as
    # one: keys k=3 (3 of them) and vectors (3) searched as one FAISS call each; the k=4 pair has a missing
    # key, so its two were answered alone
    assert after["requests"] - before["requests"] == 13 and after["batches"] - before["batches"] == 3, after
    assert sorted(batched) == [3, 3], batched
