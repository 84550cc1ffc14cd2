"""Shard expansion, output names and partitioning: exact outputs of pure functions."""
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.embedding.shards import expand, output_names, partition, sample_count, stem


def test_brace_range_expands_in_order_as_absolute_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand(["d/s-{000..003}.tar"]) == [f"{tmp_path}/d/s-00{i}.tar" for i in range(4)]


def test_glob_list_file_urls_and_dedup(tmp_path: Path):
    for n in ("b.tar", "a.tar", "c.txt"):
        (tmp_path / n).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# shards\n{tmp_path}/b.tar\n\npipe:curl -s http://h/x.tar  # remote\n")
    got = expand([f"{tmp_path}/*.tar", f"@{listing}", "s3://bucket/y.tar.gz"])
    assert got == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar", "pipe:curl -s http://h/x.tar", "s3://bucket/y.tar.gz"]


def test_glob_without_match_is_loud(tmp_path: Path):
    with pytest.raises(UserError, match="did the pattern match"):
        expand([f"{tmp_path}/*.tar"])


def test_missing_literal_path_is_kept_to_fail_as_a_shard(tmp_path: Path):
    assert expand([f"{tmp_path}/nope.tar"]) == [f"{tmp_path}/nope.tar"]


def test_stems():
    assert stem("/d/shard-001.tar") == "shard-001"
    assert stem("/d/shard-001.tar.gz") == "shard-001"
    assert stem("pipe:curl -s http://h/p/x-9.tar") == "x-9"
    assert stem("https://h/a b.tar?sig=1") == "a_b"


def test_output_names_unique_when_file_names_collide():
    names = output_names(["/a/s-0.tar", "/b/s-0.tar", "/a/s-1.tar"])
    assert names["/a/s-1.tar"] == "s-1"
    assert names["/a/s-0.tar"] != names["/b/s-0.tar"]
    assert names["/a/s-0.tar"].startswith("s-0-") and names["/b/s-0.tar"].startswith("s-0-")
    assert output_names(["/a/s-0.tar", "/b/s-0.tar"]) == {k: names[k] for k in ("/a/s-0.tar", "/b/s-0.tar")}


def test_partition_exact_and_covering():
    shards = [f"s{i}" for i in (3, 0, 4, 1, 2)]
    assert partition(shards, 0, 2) == ["s0", "s2", "s4"]
    assert partition(shards, 1, 2) == ["s1", "s3"]
    for world in (1, 2, 3, 7):
        parts = [partition(shards, r, world) for r in range(world)]
        assert sorted(s for p in parts for s in p) == sorted(shards)
    with pytest.raises(UserError):
        partition(shards, 2, 2)


def img2dataset_folder(root: Path) -> Path:
    """What img2dataset writes: NNNNN.tar with NNNNN.parquet and NNNNN_stats.json beside it, plus run files."""
    root.mkdir()
    for i, n in enumerate((7, 5)):
        (root / f"{i:05d}.tar").write_bytes(b"")
        (root / f"{i:05d}.parquet").write_bytes(b"PAR1")
        (root / f"{i:05d}_stats.json").write_text(f'{{"count": 10, "successes": {n}, "failed_to_download": 1}}')
    (root / "urls.tsv").write_text("url\tcaption\n")
    return root


def test_a_folder_means_its_tar_shards(tmp_path: Path, caplog):
    root = img2dataset_folder(tmp_path / "i2d")
    with caplog.at_level("INFO", logger="pipeline.embedding.shards"):
        assert expand([str(root)]) == [f"{root}/00000.tar", f"{root}/00001.tar"]
    assert "2 tar shards; 5 other entries skipped (e.g. 00000.parquet, 00000_stats.json, 00001.parquet)" in caplog.text
    with pytest.raises(UserError, match="no tar shards .* in the folder"):
        expand([str(tmp_path)])  # holds only the i2d folder


def test_glob_skips_sidecars_and_an_explicit_sidecar_is_refused(tmp_path: Path):
    root = img2dataset_folder(tmp_path / "i2d")
    assert expand([f"{root}/*"]) == [f"{root}/00000.tar", f"{root}/00001.tar"]
    with pytest.raises(UserError, match="00000.parquet is not a tar shard .a .parquet file."):
        expand([f"{root}/00000.parquet"])
    with pytest.raises(UserError, match="no tar shards"):
        expand([f"{root}/*.json"])


def test_img2dataset_stats_give_sample_counts(tmp_path: Path):
    root = img2dataset_folder(tmp_path / "i2d")
    assert [sample_count(u) for u in expand([str(root)])] == [7, 5]
    assert sample_count(str(tmp_path / "other.tar")) is None and sample_count("pipe:cat x.tar") is None
