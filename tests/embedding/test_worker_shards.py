"""Whole shards per DataLoader worker (issue 23, item 1): each shard is read once in all, whatever the worker
count, counted through the ``EMBEDPIPE_COUNT_READS`` hook; only a tail shard is split, by seeking."""
from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embedding.runner import embed
from pipeline.embedding.tar import COUNT_READS_ENV, UNREAD, ShardTooLarge, iter_tar_samples
from pipeline.embedding.worker_shards import shard_owners
from shards import jpeg_bytes, not_image_bytes, sample_image, write_raw_tar, write_tar
import tiny

# 3 workers on this 2-core machine: torch's warning about it is no failure.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
SAMPLES = 5  # per shard: not a multiple of 2 or 3, so split shares are uneven
# micro_batch=1: each image runs through the model alone, so its embedding does not depend on the batch the
# workers made (whole shards, or a split shard's every N-th sample). The model's thread count does differ (the
# decode workers take cores from it), and on some CPUs (oneDNN on AMX) that changes the last bits: embeddings are
# compared within float32 rounding, everything else exactly.
TINY = tiny.options(batch_size=8, out_dtype="float32", micro_batch=1, input_size=32)


def shard_members(s: int) -> list[tuple[bytes, bytes]]:
    """Real JPEGs (about 5 KB: their data outweighs the 512-byte headers) with labels, and in each shard the
    oddities whose records must come out once: a repeated key, an image that is no image, a member that is no
    sample field."""
    members = []
    for i in range(SAMPLES):
        members += [(f"s{s}_{i}.jpg".encode(), jpeg_bytes(sample_image((160, 120), seed=s * 100 + i), quality=95)),
                    (f"s{s}_{i}.cls".encode(), str(i).encode())]
    members += [(f"s{s}_1.jpg".encode(), jpeg_bytes(sample_image((160, 120), seed=999))),  # duplicate key
                (f"s{s}_bad.jpg".encode(), not_image_bytes()), (b"README", b"no extension: not a sample")]
    return members


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("whole-shards")
    return [str(write_raw_tar(root / f"w-{s}.tar", shard_members(s))) for s in range(5)]


@pytest.fixture(scope="module")
def reference(five_shards, tmp_path_factory) -> Path:
    """The five shards embedded without DataLoader workers: the rows every worker count must write."""
    out = tmp_path_factory.mktemp("ref")
    embed(five_shards, out, **TINY)
    return out


def written(out: Path) -> dict[str, tuple]:
    """Each shard's Parquet table (keys, shards, indices, labels; the embeddings apart, see :func:`same_rows`) and
    the done record's counts and lists."""
    got = {}
    for state in sorted((out / "_state").glob("*.json")):
        rec = json.loads(state.read_text())
        table = pq.read_table(out / "embeddings" / f"{state.stem}.parquet").to_pydict()
        emb = np.asarray(table.pop("embedding"), dtype=np.float32)
        got[state.stem] = (table, rec["seen"], rec["embedded"], rec["skipped"], rec.get("warnings"), emb)
    return got


def same_rows(got: dict[str, tuple], want: dict[str, tuple]) -> None:
    """Every field equal, the embeddings within float32 rounding of the model's arithmetic."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name][:-1] == want[name][:-1], name
        assert got[name][-1].shape == want[name][-1].shape
        np.testing.assert_allclose(got[name][-1], want[name][-1], rtol=0, atol=1e-5, err_msg=name)


def reads(folder: Path) -> dict[str, dict[int, int]]:
    """url -> {reading process id: bytes it read from that shard}, from the hook's files."""
    out: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for f in folder.glob("reads-*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[r["url"]][r["pid"]] += r["bytes"]
    return out


def test_whole_shards_go_round_robin_and_only_the_tail_is_split():
    tars = [f"d/{c}.tar" for c in "abcde"]
    assert shard_owners(tars[:4], 2) == [0, 1, 0, 1]
    assert shard_owners(tars, 2) == [0, 1, 0, 1, None]
    assert shard_owners(tars, 3) == [0, 1, 2, None, None]
    assert shard_owners(tars[:2], 3) == [None, None]  # fewer shards than workers: all split
    assert shard_owners(tars, 1) == shard_owners(tars, 0) == [0] * 5
    assert shard_owners([], 4) == []
    # A tail shard that cannot seek stays whole with one worker: splitting it would read it once per worker.
    odd = ["a.tar", "b.tar", "c.tar", "c.tar.gz", "pipe:cat d.tar", "http://h/e.tar", "-", "f.TGZ", "file:///g.tar"]
    assert shard_owners(odd, 10) == [None, None, None, 3, 4, 5, 6, 7, None]


@pytest.mark.parametrize("workers,count", [(2, 4), (2, 5), (3, 4), (3, 5)])
def test_each_shard_is_read_once_in_all_whatever_the_worker_count(five_shards, reference, tmp_path, monkeypatch,
                                                                  workers, count):
    urls = five_shards[:count]
    monkeypatch.setenv(COUNT_READS_ENV, str(tmp_path))
    embed(urls, tmp_path / "out", **{**TINY, "workers": workers})
    got = reads(tmp_path)
    assert sorted(got) == sorted(urls) and os.getpid() not in {p for r in got.values() for p in r}
    tail = count - count % workers
    whole_reader = {}
    for j, url in enumerate(urls):
        size, members = os.path.getsize(url), len(shard_members(j))
        by_worker = got[url]
        if j < tail:  # a whole shard: one worker read it, once, start to end; the others never opened it
            assert len(by_worker) == 1, f"shard {j} of {size} bytes read by {len(by_worker)} workers: {by_worker}"
            ((pid, n),) = by_worker.items()
            assert n == size
            whole_reader[j] = pid
        else:  # a split tail shard: its data read once in all, only its headers by every worker
            assert len(by_worker) == workers and all(n < size for n in by_worker.values())
            with tarfile.open(url) as tf:
                data = sum(m.size for m in tf.getmembers())
            assert data <= sum(by_worker.values()) <= size + 512 * members * workers
    # shard j is worker j % workers's: the same worker for j and j + workers, a different one otherwise
    assert len({whole_reader[j] for j in range(min(tail, workers))}) == min(tail, workers)
    assert all(whole_reader[j] == whole_reader[j % workers] for j in range(tail))
    ref = written(reference)
    same_rows(written(tmp_path / "out"), {k: ref[k] for k in sorted(ref)[:count]})


@pytest.mark.parametrize("share", [0, 1])
def test_a_split_read_gives_its_samples_whole_and_only_the_keys_of_the_others(tmp_path, share):
    url = str(write_raw_tar(tmp_path / "s.tar", shard_members(0)))
    full = list(iter_tar_samples(url))
    part = list(iter_tar_samples(url, wanted=lambda i: i % 2 == share))
    assert [s["__key__"] for s in part] == [s["__key__"] for s in full]  # the README record too
    samples = [(f, p) for f, p in zip(full, part) if "__not_a_sample__" not in f]
    for i, (f, p) in enumerate(samples):
        if i % 2 == share:
            assert p == f
        else:
            assert not {k for k in p if not k.startswith("__")} and sorted(p[UNREAD]) == sorted(
                k for k in f if not k.startswith("__"))


def shard_faults(root: Path) -> dict[str, tuple[str, type, str]]:
    """Broken local tars (as tests/faults/test_faults.py builds them): name -> (path, error, message)."""
    whole = write_tar(root / "whole.tar", [{"__key__": f"g{i}", "jpg": jpeg_bytes(sample_image(seed=i)), "cls": i}
                                           for i in range(4)])
    data = whole.read_bytes()
    with tarfile.open(whole) as tf:
        ms = tf.getmembers()
    bad = bytearray(data)
    bad[ms[6].offset: ms[6].offset + 100] = b"x" * 100
    cuts = {"cut_mid_member": (data[: ms[3].offset_data + ms[3].size // 2], "unexpected end of data"),
            "cut_at_member_boundary": (data[: ms[4].offset], "without its end-of-archive marker"),
            "garbled_header_mid_tar": (bytes(bad), "invalid tar header at byte"),
            "zero_bytes": (b"", "empty file")}
    out = {}
    for name, (raw, message) in cuts.items():
        (root / f"{name}.tar").write_bytes(raw)
        out[name] = (str(root / f"{name}.tar"), tarfile.ReadError, message)
    out["too_large"] = (str(whole), ShardTooLarge, "tar stream is longer than")
    return out


@pytest.mark.parametrize("share", [None, 0, 1])
@pytest.mark.parametrize("fault", ["cut_mid_member", "cut_at_member_boundary", "garbled_header_mid_tar",
                                   "zero_bytes", "too_large"])
def test_a_broken_shard_fails_alike_whether_read_whole_or_split(tmp_path, fault, share):
    url, error, message = shard_faults(tmp_path)[fault]
    wanted = None if share is None else (lambda i: i % 2 == share)
    with pytest.raises(error, match=message):
        list(iter_tar_samples(url, max_shard_gb=1e-6 if fault == "too_large" else 64, wanted=wanted))


def test_a_shard_waiting_for_its_end_keeps_its_rows_not_their_pixels():
    """Up to one shard per worker waits in the main process for its last piece: its decoded crops (150 KB an
    image at 224 px) must not wait with it."""
    import numpy as np
    import torch

    from pipeline.embedding.reader import Piece
    from pipeline.embedding.worker import _ShardBuffer

    buf = _ShardBuffer()
    images = torch.zeros(4, 3, 224, 224, dtype=torch.uint8)
    piece = Piece("s.tar", images, keys=list("abcd"), indices=[0, 1, 2, 3], labels=[None] * 4, seen=4)
    buf.add(piece, np.ones((4, 8), dtype=np.float16))
    ((kept, emb),) = buf.pieces
    assert kept.keys == list("abcd") and kept.indices == [0, 1, 2, 3] and emb.shape == (4, 8)
    pixels = kept.images.untyped_storage().nbytes()  # a view of the batch would keep its whole storage
    assert pixels == 0, f"{pixels} bytes of decoded crops kept until the shard ends"
