"""Hot reload under a real uvicorn server when `index --update`'s directory exchange swaps in a broken version.

Each case is a real index directory (FAISS, Parquet, JSON), broken in one way, exchanged in with
``atomic.staged_dir`` (what ``index --update`` uses). The old version must keep answering, ``/healthz`` must
say why the new one is not served (logged once, not every poll), the watcher must live on, and the next good
version must be swapped in.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import atomic
from pipeline.index import kinds
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.search import open_index
from pipeline.service import create_app
from pipeline.service.catalog import probe

from index_data import clustered, write_shards
from serve_helpers import call, post_json, running

pytestmark = pytest.mark.slow  # 20 broken index versions swapped under a serving instance: in `make test`, not in the fast subset

DIM, N = 512, 300
KEY = "shard-000000_00007"  # row 7


def _json(edit):
    def corrupt(d: Path) -> None:
        rec = json.loads((d / "index.json").read_text())
        edit(rec)
        (d / "index.json").write_text(json.dumps(rec))
    return corrupt


def _text(text: str):
    return lambda d: (d / "index.json").write_text(text)


def _ids(edit):
    def corrupt(d: Path) -> None:
        pq.write_table(edit(pq.read_table(d / "ids.parquet")), d / "ids.parquet")
    return corrupt


def _faiss(vectors: np.ndarray):
    def corrupt(d: Path) -> None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(d / "index.faiss"))
    return corrupt


def _int_keys(t: pa.Table) -> pa.Table:
    return t.set_column(t.schema.get_field_index("key"), "key", pa.array(np.arange(len(t)), pa.int64()))


# name -> (how the version is broken, what the error in /healthz says)
CASES = {
    "index.json is []": (_text("[]"), "expected a JSON object, found list"),
    "index.json is null": (_text("null"), "expected a JSON object, found NoneType"),
    "index.json is not JSON": (_text("{ broken"), "is unreadable"),
    "index.json is empty": (_text(""), "is unreadable"),
    "no index.json": (lambda d: (d / "index.json").unlink(), "is not an embedpipe index (no index.json)"),
    "search_params.nprobe a string": (_json(lambda r: r.update(search_params={"nprobe": "abc"})),
                                      "'search_params.nprobe' must be an integer, found 'abc'"),
    "no dim": (_json(lambda r: r.pop("dim")), "lacks dim"),
    "dim 'abc'": (_json(lambda r: r.update(dim="abc")), "'dim' must be an integer, found 'abc'"),
    "an unknown field": (_json(lambda r: r.update(surprise=1)), "unknown field(s) surprise"),
    "embedding_meta a string": (_json(lambda r: r.update(embedding_meta="x")), "expected a JSON object, found str"),
    "shards a list": (_json(lambda r: r.update(shards=[1, 2])), "a 'shards' entry is not"),
    "no index.faiss": (lambda d: (d / "index.faiss").unlink(), "index.faiss"),
    "index.faiss garbage": (lambda d: (d / "index.faiss").write_bytes(b"not faiss" * 20), "RuntimeError"),
    "FAISS dim 256 against a record of 512": (_faiss(np.zeros((N, 256), np.float32)),
                                              "holds vectors of dimension 256 but index.json says 512"),
    "index.faiss of other vectors": (_faiss(clustered(N, DIM, seed=9)), "did not return it in the first 10 hits"),
    "no ids.parquet": (lambda d: (d / "ids.parquet").unlink(), "ids.parquet"),
    "ids.parquet without key": (_ids(lambda t: t.drop(["key"])), "lacks the column(s) key"),
    "ids.parquet without row": (_ids(lambda t: t.drop(["row"])), "lacks the column(s) row"),
    "int keys": (_ids(_int_keys), "column 'key' holds int64, not strings"),
    "ids.parquet shorter than the index": (_ids(lambda t: t.slice(0, 100)), "has 100 rows but the index holds 300"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A flat index of 300 vectors (dim 512) and the vectors."""
    tmp = tmp_path_factory.mktemp("reload")
    x = clustered(N, DIM)
    write_shards(tmp / "emb", x, shards=2)
    run_index(IndexConfig(str(tmp / "emb"), out=str(tmp / "good"), kind="flat"))
    return tmp / "good", x


@pytest.fixture
def served(good, tmp_path):
    """A copy of the good index served with a watcher polling every 50 ms."""
    shutil.copytree(good[0], tmp_path / "live")
    app = create_app({"live": tmp_path / "live"}, reload_every=0.05)
    with running(app) as base:
        yield SimpleNamespace(base=base, x=good[1], good=good[0], live=tmp_path / "live",
                              catalog=app.state.service.catalog)


def swap_in(final: Path, good: Path, corrupt=None) -> None:
    """A new version of ``final``: ``good``'s files (broken by ``corrupt``), exchanged in with the one step
    `index --update` takes (``atomic.exchange_dirs``; its ``staged_dir`` would carry a removed file over)."""
    tmp = final.parent / f".{final.name}.tmp-test"
    shutil.copytree(good, tmp, copy_function=shutil.copy)  # new mtimes, as a rebuilt version has
    if corrupt is not None:
        corrupt(tmp)
    assert atomic.exchange_dirs(tmp, final)
    shutil.rmtree(tmp)  # the previous version


def wait_for(what, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (got := what()):
        if time.monotonic() > deadline:
            return got
        time.sleep(0.02)
    return got


def answers(s, generation: int) -> None:
    """Key and vector searches are answered by ``generation``, with the right neighbours."""
    r = post_json(f"{s.base}/search", {"keys": [KEY], "k": 3})
    assert r.status == 200, r
    assert r.json()["generation"] == generation and r.json()["results"][0]["results"][0]["key"] != KEY
    r = post_json(f"{s.base}/search", {"vectors": [s.x[7].tolist()], "k": 1})
    assert r.status == 200, r
    assert r.json()["results"][0]["results"][0]["key"] == KEY


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(served, case, caplog):
    corrupt, reason = CASES[case]
    s, live, before = served, served.live, 1
    caplog.set_level(logging.WARNING, logger="pipeline.service.catalog")
    swap_in(live, s.good, corrupt)
    health = wait_for(lambda: (h := call(f"{s.base}/healthz").json())["reload_errors"] and h)
    assert health, f"{case}: /healthz never reported the broken version: {call(f'{s.base}/healthz').json()}"
    assert s.catalog._watcher.is_alive(), "the reload thread died"
    assert health["indexes"]["live"]["generation"] == before, "the broken version was swapped in"
    answers(s, before)  # the old version still answers, and right
    err = health["reload_errors"]["live"]
    assert reason in str(err), err
    assert health["status"] == "degraded" and err["serving"] == before and err["at"][:2] == "20"  # when: ISO time
    time.sleep(0.3)  # several more polls of the same broken version: no new log line
    logged = [r for r in caplog.records if "cannot be served" in r.getMessage()]
    assert len(logged) == 1 and reason in logged[0].getMessage(), [r.getMessage() for r in logged]

    swap_in(live, s.good)  # the next good version IS swapped in
    health = wait_for(lambda: (h := call(f"{s.base}/healthz").json())["indexes"]["live"]["generation"] > before and h)
    assert health, f"{case}: the good version after it was never loaded"
    assert health["indexes"]["live"]["generation"] == before + 1 and health["reload_errors"] == {}
    assert health["status"] == "ok" and s.catalog._watcher.is_alive()
    answers(s, before + 1)


def test_the_watcher_survives_an_error_outside_any_one_index(served, monkeypatch, caplog):
    """Whatever check() raises, the thread logs it and goes on watching (a dead watcher never reloads again)."""
    s = served
    calls = []

    def broken():
        calls.append(1)
        raise AttributeError("simulated bug in the watcher's check")

    monkeypatch.setattr(s.catalog, "check", broken)
    assert wait_for(lambda: len(calls) >= 3, 5), "the watcher stopped calling check()"
    assert s.catalog._watcher.is_alive()
    assert sum("still watching" in r.getMessage() for r in caplog.records) == 1  # once, not per poll
    monkeypatch.undo()
    before = s.catalog.current["live"].generation
    swap_in(s.live, s.good)
    assert wait_for(lambda: s.catalog.current["live"].generation == before + 1), "no reload after the error"


@pytest.mark.parametrize("kind", kinds.kind_names())
def test_the_probe_passes_a_good_index_of_every_kind(tmp_path, kind):
    write_shards(tmp_path / "emb", clustered(2000, 32, seed=4), shards=2)
    run_index(IndexConfig(str(tmp_path / "emb"), out=str(tmp_path / "idx"), kind=kind))
    probe(open_index(tmp_path / "idx"))


def test_the_probe_accepts_a_row_outranked_by_longer_vectors(tmp_path):
    """(Refusing an index.faiss of other vectors is the reload case above.)"""
    x = clustered(100, 8, seed=5)
    x[0] *= 0.1  # not normalised: under inner product every vector near it outranks row 0
    write_shards(tmp_path / "emb", x, shards=1)
    run_index(IndexConfig(str(tmp_path / "emb"), out=str(tmp_path / "idx"), kind="flat"))
    idx = open_index(tmp_path / "idx")
    assert 0 not in idx.search(x[:1], 10).ids[0].tolist()
    probe(idx)
