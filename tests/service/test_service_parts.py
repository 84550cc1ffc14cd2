"""The service's parts on their own: the image batcher, the memory for bodies, thumbnails from shards, index names,
cached lookups, captions."""
from __future__ import annotations

import asyncio
import gzip
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline import store
from pipeline.embedding.tar import iter_tar_samples
from pipeline.errors import UserError
from pipeline.index.build import run_index
from pipeline.index.html_page import images_by_key
from pipeline.index.options import IndexConfig
from pipeline.index.search import open_index
from pipeline.service import create_app
from pipeline.service.batcher import Batcher
from pipeline.service.bodies import BodyBudget
from pipeline.service.options import index_names
from pipeline.service.run import serve
from pipeline.service.thumbs import ShardImages

from index_data import clustered, meta, write_shards
from shards import jpeg_bytes, sample_image, write_raw_tar
from serve_helpers import post_json, running


def run_batcher(sizes, wait_s=0.05, max_batch=8, fail=False):
    """Requests of ``sizes`` images each, all at once; returns (their answers, the model calls' sizes)."""
    calls, model = [], ThreadPoolExecutor(1)

    def embed(images):
        assert threading.current_thread() is not threading.main_thread()  # never on the event loop's thread
        calls.append(len(images))
        if fail:
            raise RuntimeError("model broke")
        return np.array([[float(i)] for i in images])

    async def main():
        b = Batcher(embed, model, wait_s, max_batch)
        start, reqs = 0, []
        for n in sizes:
            reqs.append(b.embed(list(range(start, start + n))))
            start += n
        return await asyncio.gather(*reqs, return_exceptions=True), b.stats()

    try:
        answers, stats = asyncio.run(main())
    finally:
        model.shutdown()
    return answers, calls, stats


def test_batcher_groups_requests_and_splits_answers():
    answers, calls, stats = run_batcher([1, 2, 3, 1])
    assert calls == [7] and stats == {"batches": 1, "images": 7, "mean_batch": 7.0}
    assert [a[:, 0].tolist() for a in answers] == [[0], [1, 2], [3, 4, 5], [6]]


def test_batcher_respects_max_batch_and_keeps_requests_whole():
    answers, calls, _ = run_batcher([3, 3, 3, 3, 1], max_batch=8)
    assert calls == [6, 7] and sum(len(a) for a in answers) == 13
    answers, calls, _ = run_batcher([10], max_batch=4)  # one request larger than a batch still goes in one call
    assert calls == [10] and answers[0].shape == (10, 1)


def test_batcher_reports_a_model_error_to_every_request_of_the_batch():
    answers, calls, stats = run_batcher([1, 2], fail=True)
    assert calls == [3] and all(isinstance(a, RuntimeError) for a in answers) and stats["batches"] == 0


def test_body_budget_admits_first_come_first_served_and_gives_back_what_a_timed_out_wait_held():
    async def main():
        budget, order = BodyBudget(10), []

        async def body(name, n, timeout=5.0, hold=0.05):
            held = await budget.hold(n, timeout)
            order.append((name, held, budget.free))
            await asyncio.sleep(hold)
            budget.release(held)

        first = asyncio.ensure_future(body("a", 6, hold=0.2))
        await asyncio.sleep(0)
        late = [asyncio.ensure_future(body("b", 6)), asyncio.ensure_future(body("c", 3))]  # c fits, but waits its turn
        with pytest.raises(asyncio.TimeoutError):
            await budget.hold(6, 0.05)  # gave up while a held the room: it leaves the queue, holding nothing
        await asyncio.gather(first, *late)
        await body("huge", 100)  # more than the whole budget: admitted alone, as the whole budget
        return order, budget.free, len(budget.waiting)

    order, free, waiting = asyncio.run(main())
    assert order == [("a", 6, 4), ("b", 6, 1), ("c", 3, 1), ("huge", 10, 0)]  # b and c let in together
    assert free == 10 and waiting == 0


def test_thumbnails_from_plain_and_gzipped_shards_match_the_streamed_reader(digits_shards, tmp_path):
    plain = str(digits_shards[0])
    gz = tmp_path / "digits-000000.tar.gz"
    gz.write_bytes(gzip.compress(digits_shards[0].read_bytes()))
    images = ShardImages(max_pixels=10 ** 8)
    keys = ["digits_000360", "digits_000196"]
    streamed = images_by_key({plain: set(keys)})
    for key in keys:
        assert images.image(plain, key) == streamed[(plain, key)]  # one seek per image
        assert images.image(str(gz), key) == streamed[(plain, key)]  # compressed: streamed
        assert images.image(f"file://{plain}", key) == streamed[(plain, key)]
    assert images.tables[str(gz)] is None and len(images.tables[plain]) == 100
    assert images.image(plain, "no_such_key") is None and images.thumbnail(plain, "no_such_key") is None
    assert images.image(str(tmp_path / "gone.tar"), keys[0]) is None
    assert images.thumbnail(plain, keys[0])[:2] == b"\xff\xd8"
    assert ShardImages(max_pixels=100).thumbnail(plain, keys[0]) is None  # above the pixel limit: not decoded


def test_thumbnail_of_a_key_stored_escaped_is_found(tmp_path):
    """A non-UTF-8 member name is stored escaped (``bad_\\xff``); the thumbnail reader must use the same key rule."""
    good = jpeg_bytes(sample_image((40, 32), seed=1))
    url = str(write_raw_tar(tmp_path / "raw.tar", [(b"ok.jpg", jpeg_bytes(sample_image((40, 32)))),
                                                   (b"sub/bad_\xff.x.jpg", b"not this one"), (b"bad_\xff.jpg", good)]))
    stored = [s["__key__"] for s in iter_tar_samples(url)]  # the keys embed writes to the Parquet files
    assert stored == ["ok", "sub/bad_\\xff", "bad_\\xff"]
    images = ShardImages(max_pixels=10 ** 8)
    assert images.image(url, "bad_\\xff") == good
    assert images.image(url, "sub/bad_\\xff") is None  # its extension is x.jpg, not an image extension


def test_pipe_urls_recorded_in_an_index_are_never_run(tmp_path):
    marker = tmp_path / "pwned"
    assert ShardImages(10 ** 8).thumbnail(f"pipe:touch {marker}; cat /dev/null", "k") is None
    assert not marker.exists()


def test_index_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b=c" / "idx").mkdir(parents=True)
    assert index_names([tmp_path / "a", f"x={tmp_path / 'a'}"]) == {"a": tmp_path / "a", "x": tmp_path / "a"}
    assert index_names([str(tmp_path / "b=c" / "idx")]) == {"idx": tmp_path / "b=c" / "idx"}  # a path, not NAME=
    with pytest.raises(UserError, match="two indexes are named 'a'"):
        index_names([tmp_path / "a", tmp_path / "a"])
    with pytest.raises(UserError, match="not usable in urls"):
        index_names([f"{tmp_path}/a b"])
    with pytest.raises(UserError, match="at least one INDEX_DIR"):
        index_names([])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A flat index of vectors whose embedding files keep captions (``txt``) and img2dataset-style ``json``."""
    tmp = tmp_path_factory.mktemp("captioned")
    x = clustered(300, 16)
    write_shards(tmp / "emb", x[:100], shards=1)  # no captions in this file
    keys = [f"cap_{i:03d}" for i in range(200)]
    extra = {"txt": [f"caption {i}" if i % 2 == 0 else None for i in range(200)],
             "json": [f'{{"url": "https://example.com/{i}.jpg"}}' if i % 3 == 0 else "{}" for i in range(200)]}
    t = store.embedding_table(keys, "cap.tar", range(200), [None] * 200, x[100:], dtype="float32", extra=extra,
                              metadata=meta(16))
    store.write_table(tmp / "emb" / "embeddings" / "cap-000000.parquet", t)
    run_index(IndexConfig(str(tmp / "emb"), out=str(tmp / "idx"), kind="flat"))
    return tmp, x


def test_cached_lookups_answer_like_uncached_ones(captioned):
    tmp, _ = captioned
    plain, cached = open_index(tmp / "idx"), open_index(tmp / "idx")
    cached.cache_lookups(vector_bytes=1 << 20)
    keys = ["cap_007", "shard-000000_00003", "cap_150"]
    assert plain.lookup(keys).tolist() == cached.lookup(keys).tolist()
    assert cached.known_ids(["nope", "cap_000"]).tolist() == [-1, plain.lookup(["cap_000"])[0]]
    with pytest.raises(UserError, match="1 key\\(s\\) not in the index"):
        cached.lookup(["nope"])
    for _ in range(2):  # the second time from the cache
        np.testing.assert_array_equal(plain.vectors(plain.lookup(keys)), cached.vectors(cached.lookup(keys)))
        a, b = plain.search_keys(keys, k=5), cached.search_keys(keys, k=5)
        assert a.keys == b.keys and a.shards == b.shards and a.indices == b.indices
        ids = cached.lookup(keys)
        assert cached.stored(ids, ["txt"]) == plain.stored(ids, ["txt"]) == {"txt": [None, None, "caption 150"]}
        assert plain.stored(ids, ["no_such_column"]) == {"no_such_column": [None] * 3}


def test_warm_cache_reads_stored_vectors_while_they_fit(captioned):
    tmp, x = captioned
    idx = open_index(tmp / "idx")
    assert idx.warm_cache() == 0  # no cache asked for: nothing read
    idx.cache_lookups(vector_bytes=1 << 20)
    assert idx.warm_cache() == 2 and idx.warm_cache() == 0  # both files, then nothing left to read
    np.testing.assert_array_equal(idx.vectors(idx.lookup(["cap_150"])), x[250:251])
    tight = open_index(tmp / "idx")
    tight.cache_lookups(vector_bytes=1)  # room for less than one file: the first is read, no more
    assert tight.warm_cache() == 1


def test_answers_carry_captions_and_urls(captioned):
    tmp, x = captioned
    with running(create_app([tmp / "idx"])) as base:
        r = post_json(f"{base}/search", {"vectors": [x[100 + 150].tolist()], "k": 1})
        assert r.status == 200, r
        hit = r.json()["results"][0]["results"][0]
        r = post_json(f"{base}/search", {"images": ["aGVsbG8="]})
        assert r.status == 400 and "unknown model" in r.json()["error"].lower()
    assert hit["key"] == "cap_150" and hit["caption"] == "caption 150" and hit["url"] == "https://example.com/150.jpg"


def test_a_directory_that_breaks_keeps_the_old_version_served(captioned, tmp_path):
    tmp, _ = captioned
    shutil.copytree(tmp / "idx", tmp_path / "idx")
    app = create_app([tmp_path / "idx"], reload_every=0)  # checked by hand below
    cat = app.state.service.catalog
    (tmp_path / "idx" / "index.json").write_text("{ broken")
    assert cat.check() == [] and "idx" in cat.reload_errors and cat.current["idx"].generation == 1
    shutil.copy(tmp / "idx" / "index.json", tmp_path / "idx" / "index.json")
    assert cat.check() == ["idx"] and cat.current["idx"].generation == 2 and cat.reload_errors == {}
    app.state.service.close()


def test_serving_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs the serve extra \(uvicorn is missing\): pip install 'embedpipe\[serve\]'"):
        serve(["idx"])


@pytest.mark.parametrize("fast", [True, False])
def test_wire_json_with_and_without_orjson(monkeypatch, fast):
    from pipeline.service import wire
    from pipeline.service.options import ServeOptions
    from pipeline.service.queries import from_bytes

    if not fast:
        monkeypatch.setattr(wire, "orjson", None)
    elif wire.orjson is None:
        pytest.skip("orjson is not installed")
    answer = {"index": "i", "k": 2, "results": [{"query": "ä", "results": [{"rank": 1, "score": 0.5, "id": 3}]}]}
    assert wire.loads(wire.dumps(answer)) == answer
    q = from_bytes(b'{"vectors": [[0.25, -1.5e-3, 2]], "k": 3}', ServeOptions())
    assert q.k == 3 and q.vectors.dtype == np.float32 and q.vectors.tolist() == [[0.25, np.float32(-1.5e-3), 2.0]]
    for bad in (b'{"keys": [', b'\xff\xfe', b"[1, 2"):
        with pytest.raises(Exception, match="not valid JSON") as e:
            from_bytes(bad, ServeOptions())
        assert e.value.status_code == 400
