"""Tar members that are no sample field (issue 24, item 10): symlinks, hard links, FIFOs, devices, and names with
no key (``.jpg``) or no extension. They used to vanish; each is now in the done record with its reason."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.embedding.reader import ShardSamples
from pipeline.model.preprocess import Preprocess
from shards import jpeg_bytes, sample_image
import tiny

GOOD = {f"good_{i}": jpeg_bytes(sample_image((56, 44), seed=400 + i)) for i in range(3)}
# member name -> its reason in the done record (its key there is the member's name)
ODD = {
    "link.jpg": "tar member 'link.jpg' is a symbolic link (to 'good_0.jpg'), not a regular file; not read",
    "hard.jpg": "tar member 'hard.jpg' is a hard link (to 'good_0.jpg'), not a regular file; not read",
    "fifo.jpg": "tar member 'fifo.jpg' is a FIFO, not a regular file; not read",
    "tty.jpg": "tar member 'tty.jpg' is a character device, not a regular file; not read",
    "disk.jpg": "tar member 'disk.jpg' is a block device, not a regular file; not read",
    ".jpg": "tar member '.jpg' has no sample key (its name starts with a dot; a sample's members are named KEY.EXT); "
            "not read",
    "sub/.png": "tar member 'sub/.png' has no sample key (its name starts with a dot; a sample's members are named "
                "KEY.EXT); not read",
    "README": "tar member 'README' has no extension (a sample's members are named KEY.EXT); not read",
    "trailing.": "tar member 'trailing.' has no extension (a sample's members are named KEY.EXT); not read",
}
KINDS = {"link.jpg": tarfile.SYMTYPE, "hard.jpg": tarfile.LNKTYPE, "fifo.jpg": tarfile.FIFOTYPE,
         "tty.jpg": tarfile.CHRTYPE, "disk.jpg": tarfile.BLKTYPE}


def odd_shard(path):
    """good_0, then every odd member (one in the middle of good_1's members), a directory, then good_2."""
    def add(tf, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.mtime, info.size = kind, 0, len(data)
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "good_0.jpg"
        tf.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        add(tf, "good_0.jpg", GOOD["good_0"])
        add(tf, "sub", kind=tarfile.DIRTYPE)  # structure, not data: passes silently
        add(tf, "good_1.cls", b"1")
        for name in ODD:
            add(tf, name, b"not read" if name not in KINDS else b"", KINDS.get(name, tarfile.REGTYPE))
        add(tf, "good_1.jpg", GOOD["good_1"])  # the same sample as good_1.cls, despite the members between
        add(tf, "good_2.jpg", GOOD["good_2"])
    return str(path)


def test_each_odd_member_is_skipped_with_its_reason_and_the_samples_stay_whole(tmp_path):
    (piece,) = ShardSamples([odd_shard(tmp_path / "odd.tar")], Preprocess(input_size=32, resize_size=36), 16)
    assert piece.failed is None and piece.keys == ["good_0", "good_1", "good_2"]
    assert piece.labels == [None, 1, None]
    assert sorted(piece.skipped) == sorted(ODD.items())
    assert piece.seen == len(piece.keys) + len(piece.skipped)


@pytest.mark.slow
def test_the_done_record_names_every_odd_member_once_with_two_workers(tmp_path):
    url = odd_shard(tmp_path / "odd.tar")
    r = CliRunner().invoke(cli, ["embed", url, "--out", str(tmp_path / "out"), *tiny.cli_args(workers=2)])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "out" / "_state" / "odd.json").read_text())
    assert rec["embedded"] == 3 and rec["seen"] == 3 + len(ODD)
    assert rec["skipped"] == sorted(({"key": k, "reason": v} for k, v in ODD.items()), key=lambda s: s["key"])
