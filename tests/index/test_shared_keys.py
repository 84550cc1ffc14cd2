"""Rows are (shard, key): two img2dataset runs numbering keys from 000000000 share an output folder and an index."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import open_index
from pipeline.errors import UserError
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig
from pipeline.index.query import run_search
from pipeline.verify import run_verify
from two_runs import KEYS, embed_two_runs

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    return embed_two_runs(tmp_path_factory.mktemp("shared"))


def test_update_adds_a_second_run_that_reuses_keys_then_has_nothing_to_add(two_runs):
    idx_dir = two_runs["root"] / "index-updated"
    res = run_index(IndexConfig(str(two_runs["out"]), str(idx_dir), update=True))
    assert res["record"].count == 2 * len(KEYS)
    again = run_index(IndexConfig(str(two_runs["out"]), str(idx_dir), update=True))
    assert again["summary"].startswith("nothing to add")
    shards = {r["shard"] for r in open_index(idx_dir).ids.select(["shard"]).to_pylist()}
    assert {Path(s).parent.name for s in shards} == {"run1", "run2"}


def test_update_still_refuses_a_re_embedded_copy_of_an_indexed_shard(two_runs, tmp_path):
    idx_dir = tmp_path / "index"
    shutil.copytree(two_runs["root"] / "index-run1", idx_dir)
    copy = tmp_path / "copies"
    copy.mkdir()
    first = two_runs["run1_file"]
    shutil.copy(first, copy / "renamed.parquet")  # the same shard's rows under another file name
    with pytest.raises(UserError, match="already in the index .* the same shard embedded again"):
        run_index(IndexConfig(str(copy), str(idx_dir), update=True))


@pytest.fixture(scope="module")
def full_index(two_runs) -> Path:
    out = two_runs["root"] / "index-full"
    run_index(IndexConfig(str(two_runs["out"]), str(out), kind="flat"))
    return out


def test_search_by_a_shared_key_answers_for_each_shard_and_a_shard_picks_one(full_index):
    idx = open_index(full_index)
    records = idx.search_keys([KEYS[1]], k=3).records()
    assert [Path(r["query_shard"]).parent.name for r in records] == ["run1", "run2"]
    for r in records:  # each query excludes its own row only: the twin (another image) may be a neighbour
        assert (r["query_shard"], KEYS[1]) not in {(h["shard"], h["key"]) for h in r["results"]}
    picked = idx.search_keys([KEYS[1]], k=3, shards="run2/00000.tar").records()
    assert len(picked) == 1 and Path(picked[0]["query_shard"]).parent.name == "run2"
    assert picked[0]["results"] == records[1]["results"]
    with pytest.raises(UserError, match="ambiguous.*--key-shard"):
        idx.lookup([KEYS[1]])
    with pytest.raises(UserError, match="not in a shard matching 'run3/00000.tar'.*run1"):
        idx.search_keys([KEYS[1]], shards="run3/00000.tar")


def test_cli_search_labels_each_shard_of_a_shared_key(full_index):
    table = "\n".join(run_search(full_index, KEYS[2], k=2))
    assert f"{KEYS[2]} (run1/00000.tar)" in table and f"{KEYS[2]} (run2/00000.tar)" in table
    one = list(run_search(full_index, KEYS[2], k=2, key_shard="run1/00000.tar"))
    assert "run2/00000.tar)" not in one[0] and one[-1].endswith("1 queries, k=2")


def test_cached_lookups_resolve_shared_keys_like_uncached_ones(full_index):
    plain, cached = open_index(full_index), open_index(full_index)
    cached.cache_lookups()
    a, b = plain.search_keys(KEYS, k=2).records(), cached.search_keys(KEYS, k=2).records()
    assert a == b and len(a) == 2 * len(KEYS)
    assert cached.key_is_shared(KEYS[0]) and plain.key_is_shared(KEYS[0])


def test_verify_reports_shared_keys_as_a_finding_and_a_repeated_row_as_a_problem(two_runs, full_index, tmp_path):
    for path in (two_runs["out"], full_index):
        problems, info = run_verify(path)
        assert problems == []
        assert any("4 key(s) occur in more than one shard" in f for f in info["findings"]), info["findings"]
    plain = tmp_path / "plain"
    plain.mkdir()
    first = two_runs["run1_file"]
    shutil.copy(first, plain / "a.parquet")
    shutil.copy(first, plain / "b.parquet")  # a stray copy: the same rows twice
    run_index(IndexConfig(str(plain), str(tmp_path / "twice"), kind="flat"))
    problems, _ = run_verify(tmp_path / "twice")
    assert any("repeat a (shard, key)" in p for p in problems), problems
