"""Tar and gzip bombs (issue 24, item 2): members far larger than their shard, which embed used to read whole.

Each input is the exact one of the issue, between two good JPEGs: a 10 KB tar with a 3 GiB sparse member
(4.4 GB of RSS before), a 2 MB ``.tar.gz`` holding a 2 GiB member (7.4 GB) and a 1.5 GB ``.bin`` member that
is no image field (5.9 GB). The peak RSS of an `embedpipe embed` over each must stay within 0.2 GB of a clean
run's; the good samples are embedded, a used member above --max-member-mb skips its sample with the reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shards import jpeg_bytes, sample_image, write_tar
from tar_bombs import hole_tar, sparse_member_tar, zeros_tar_gz
import tiny

pytestmark = pytest.mark.slow  # gigabytes streamed through real processes

ARGS = tiny.cli_args(out_dtype="float32")
GIB = 1 << 30
# The CLI in a process that reports its own peak RSS (workers=0: the tar is read in this process) when it exits.
PEAK = ("import atexit, resource, sys; atexit.register(lambda: print('maxrss', resource.getrusage("
        "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); from pipeline.cli import main; main()")


def good(i: int) -> bytes:
    return jpeg_bytes(sample_image((56, 44), seed=300 + i))


def embed_peak(url: str, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """`embedpipe embed url` in a fresh process: its result and its peak RSS in GB."""
    r = subprocess.run([sys.executable, "-c", PEAK, "embed", url, "--out", str(out), *ARGS, *extra],
                       capture_output=True, text=True, timeout=600)
    return r, int(r.stderr.split("maxrss")[-1].split()[0]) / 1e6


def record(out: Path, url: str) -> dict:
    (path,) = (out / "_state").glob(f"{Path(url).name.split('.')[0]}.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    around = ([("good_0.jpg", good(0))], [("good_1.jpg", good(1))])
    urls = {
        "clean": str(write_tar(root / "clean.tar", [{"__key__": f"good_{i}", "jpg": good(i)} for i in (0, 1)])),
        "sparse_3gib": str(sparse_member_tar(root / "sparse_3gib.tar", around[0], "bomb.jpg", 3 * GIB, around[1])),
        "gzip_2gib": str(zeros_tar_gz(root / "gzip_2gib.tar.gz", [*around[0], ("bomb.jpg", 2 * GIB), *around[1]])),
        # a sample whose image is fine beside a 1.5 GB field nobody reads: it is embedded
        "bin_1_5gb": str(hole_tar(root / "bin_1_5gb.tar", [*around[0], ("big.bin", 1_500_000_000),
                                                           ("big.jpg", good(2)), *around[1]])),
    }
    sizes = {name: Path(u).stat().st_size for name, u in urls.items()}
    assert sizes["sparse_3gib"] == 10240 and sizes["gzip_2gib"] < 2_200_000  # the inputs, as described
    return root, urls


@pytest.fixture(scope="module")
def clean_peak(inputs):
    root, urls = inputs
    r, peak = embed_peak(urls["clean"], root / "clean_out")
    assert r.returncode == 0, r.stderr[-2000:]
    return peak


BOMBS = {"sparse_3gib": ("bomb", "its .jpg member is 3072.0 MB, above the limit of 64 MB (--max-member-mb); not read"),
         "gzip_2gib": ("bomb", "its .jpg member is 2048.0 MB, above the limit of 64 MB (--max-member-mb); not read"),
         "bin_1_5gb": (None, None)}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_bomb_costs_no_memory_and_only_its_sample(inputs, clean_peak, name):
    root, urls = inputs
    r, peak = embed_peak(urls[name], root / f"{name}_out")
    print(f"peak RSS {name}: {peak:.3f} GB (clean run {clean_peak:.3f} GB)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert peak <= clean_peak + 0.2, f"peak RSS {peak:.2f} GB against {clean_peak:.2f} GB for a clean run"
    rec = record(root / f"{name}_out", urls[name])
    key, reason = BOMBS[name]
    assert rec["skipped"] == ([{"key": key, "reason": reason}] if key else [])
    assert rec["embedded"] == (2 if key else 3)


def test_a_shard_that_decompresses_past_its_limit_fails_and_is_retried(tmp_path):
    url = str(zeros_tar_gz(tmp_path / "z.tar.gz", [("good_0.jpg", good(0)), ("good_0.bin", 8 << 20),
                                                  ("good_1.jpg", good(1))]))
    out = tmp_path / "out"
    r, _ = embed_peak(url, out, "--max-shard-gb", "0.005")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert ("ShardTooLarge: the shard's tar stream is longer than 0.005 GB (after decompression; --max-shard-gb)"
            in r.stderr)
    assert list((out / "_state").glob("*.failed.json")) and not (out / "_SUCCESS").exists()
    r, _ = embed_peak(url, out)  # the same command without the limit retries it
    assert r.returncode == 0, r.stderr[-2000:]
    assert record(out, url)["embedded"] == 2 and (out / "_SUCCESS").exists()


def test_a_used_member_over_the_member_limit_skips_its_sample(tmp_path):
    big = jpeg_bytes(sample_image((400, 300), seed=1), quality=100)  # over 0.01 MB
    url = str(write_tar(tmp_path / "s.tar", [{"__key__": "good_0", "jpg": good(0)}, {"__key__": "big", "jpg": big},
                                            {"__key__": "good_1", "jpg": good(1), "txt": "x" * 20_000}]))
    r, _ = embed_peak(url, tmp_path / "out", "--max-member-mb", "0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = record(tmp_path / "out", url)
    assert rec["embedded"] == 1 and {s["key"] for s in rec["skipped"]} == {"big", "good_1"}
    assert all("above the limit of 0.01 MB (--max-member-mb); not read" in s["reason"] for s in rec["skipped"])
