"""Every input fault a night job meets, in real tar shards, through one `embedpipe embed` run.

Each fault sits in its own shard between good samples. Expected outcome per fault: the sample is skipped
with a reason (recorded in the shard's done record), or decoded and embedded exactly like a reference
image holding the pixels it should decode to, or the whole shard fails (``_state/<shard>.failed.json``,
no Parquet, exit status 1, retried next run). Around every per-sample fault the good samples are embedded.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from pipeline import store
from pipeline.cli import cli
from shards import (bomb_png_bytes, cmyk_jpeg_bytes, exif_rotated_jpeg_bytes, grayscale_jpeg_bytes, jpeg_bytes,
                    not_image_bytes, one_pixel_jpeg_bytes, palette_png_bytes, png16_bytes, png_bytes, sample_image,
                    truncated_jpeg_bytes, write_tar)
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


ARGS = tiny.cli_args(out_dtype="float32", batch_size=16)


def good(i: int) -> dict:
    return {"__key__": f"good_{i}", "jpg": jpeg_bytes(sample_image((56, 44), seed=100 + i)), "cls": i}


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def on_white(data: bytes) -> np.ndarray:
    rgba = Image.open(io.BytesIO(data)).convert("RGBA")
    bg = Image.new("RGB", rgba.size, (255, 255, 255))
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return np.asarray(bg)


def top_byte_gray(data: bytes) -> np.ndarray:
    g = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint16) >> 8).astype(np.uint8)
    return np.stack([g] * 3, axis=-1)


def raw_orientation(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # EXIF orientation ignored


# Per-sample faults: name -> (member ext, bytes, reason substring). The bytes sit between good_0 and good_1.
SKIPPED = {
    "truncated_jpeg": ("jpg", truncated_jpeg_bytes(), "truncated JPEG"),
    "not_an_image": ("jpg", not_image_bytes(), "not a decodable image"),
    "zero_byte_member": ("jpg", b"", "empty image (0 bytes)"),
    # headers claiming 50 000² (refused by PIL's own guard on open) and 12 000² (above --max-pixels' 1e8)
    "decompression_bomb": ("png", bomb_png_bytes(50_000, 50_000), "decompression bomb refused"),
    "decompression_bomb_12k": ("png", bomb_png_bytes(12_000, 12_000), "12000x12000 pixels, above the limit of 100000000"),
}
# Odd but valid images: name -> (ext, bytes, pixels it must decode to, pixels a naive decoder gives or None).
DECODED = {
    "cmyk_jpeg": ("jpg", cmyk_jpeg_bytes(), pil_rgb, None),
    "png_16_bit": ("png", png16_bytes(), top_byte_gray, lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))),
    "palette_png_transparent": ("png", palette_png_bytes(), on_white, lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))),
    "one_pixel": ("jpg", one_pixel_jpeg_bytes(), pil_rgb, None),
    "exif_rotated": ("jpg", exif_rotated_jpeg_bytes(), pil_rgb, raw_orientation),
    "grayscale_jpeg": ("jpg", grayscale_jpeg_bytes(), pil_rgb, None),
}
# Whole-shard faults: name -> reason substring in the failed record (None: the shard is done with 0 rows).
SHARD_FAULTS = {
    "tar_cut_mid_member": "unexpected end of data",
    "tar_cut_at_member_boundary": "without its end-of-archive marker",
    "garbled_header_mid_tar": "invalid tar header at byte",
    "empty_tar": None,
    "zero_byte_tar_file": "empty file",
    "corrupt_gzip": "CRC check failed",
    "truncated_gzip": "end-of-stream marker",
    "missing_path": "No such file",
    "pipe_false": "exited with status 1",
    "pipe_cat_missing": "exited with status 1",
    "pipe_empty_output": "empty file",
    "http_closed_port": "exited with status 7",
}


def build(root: Path) -> dict[str, str]:
    """Write one shard per fault under ``root``; returns fault name -> shard url."""
    urls: dict[str, str] = {}
    for name, (ext, data, _) in SKIPPED.items():
        urls[name] = str(write_tar(root / f"{name}.tar", [good(0), {"__key__": "fault", ext: data}, good(1)]))
    for name, (ext, data, expect, wrong) in DECODED.items():
        samples = [good(0), {"__key__": "fault", ext: data}, {"__key__": "ref", "png": png_bytes(expect(data))}]
        if wrong is not None:
            samples.append({"__key__": "wrong", "png": png_bytes(wrong(data))})
        urls[name] = str(write_tar(root / f"{name}.tar", samples + [good(1)]))
    urls["no_image_field"] = str(write_tar(root / "no_image_field.tar",
                                           [good(0), {"__key__": "fault", "txt": "a caption, no picture"}, good(1)]))
    # The same key twice, apart and adjacent (member names repeated back to back): first kept, repeat skipped.
    twin = {"__key__": "good_0", "jpg": jpeg_bytes(sample_image((56, 44), seed=7))}
    urls["duplicate_key"] = str(write_tar(root / "duplicate_key.tar", [good(0), good(1), twin, good(2), good(2), good(3)]))
    whole = write_tar(root / "whole.tar", [good(i) for i in range(4)])
    data = whole.read_bytes()
    with tarfile.open(whole) as tf:
        m = tf.getmembers()[3]  # good_1.jpg: cut in the middle of its data
        cut = m.offset_data + m.size // 2
        boundary, garbled = tf.getmembers()[4].offset, tf.getmembers()[6].offset  # good_2.cls, good_3.cls
    (root / "tar_cut_mid_member.tar").write_bytes(data[:cut])
    (root / "tar_cut_at_member_boundary.tar").write_bytes(data[:boundary])  # tarfile alone stops here silently
    bad = bytearray(data)
    bad[garbled: garbled + 100] = b"x" * 100  # a garbled header (member name): tarfile alone stops silently
    (root / "garbled_header_mid_tar.tar").write_bytes(bytes(bad))
    for name in ("tar_cut_at_member_boundary", "garbled_header_mid_tar"):
        urls[name] = str(root / f"{name}.tar")
    urls["tar_cut_mid_member"] = str(root / "tar_cut_mid_member.tar")
    with tarfile.open(root / "empty_tar.tar", "w"):
        pass  # a valid tar with no members (what img2dataset writes when every download failed)
    urls["empty_tar"] = str(root / "empty_tar.tar")
    (root / "zero_byte_tar_file.tar").write_bytes(b"")
    urls["zero_byte_tar_file"] = str(root / "zero_byte_tar_file.tar")
    gz = bytearray(gzip.compress(data))
    gz[len(gz) // 2: len(gz) // 2 + 64] = bytes(64)  # corrupt deflate data: tarfile alone reads a short shard
    (root / "corrupt_gzip.tar.gz").write_bytes(bytes(gz))
    urls["corrupt_gzip"] = str(root / "corrupt_gzip.tar.gz")
    (root / "truncated_gzip.tar.gz").write_bytes(gzip.compress(data)[:-100])
    urls["truncated_gzip"] = str(root / "truncated_gzip.tar.gz")
    urls["missing_path"] = str(root / "no-such-dir" / "missing.tar")
    urls["pipe_false"] = "pipe:false"
    urls["pipe_cat_missing"] = f"pipe:cat {root}/nonexistent.tar"
    urls["pipe_empty_output"] = "pipe:true"
    urls["http_closed_port"] = "http://127.0.0.1:9/x.tar"  # nothing listens on the discard port: refused at once
    return urls


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    urls = build(root / "in")
    out = root / "out"
    r = CliRunner().invoke(cli, ["embed", *urls.values(), "--out", str(out), *ARGS])
    return urls, out, r


def record(out: Path, url: str) -> dict:
    from pipeline.embedding.shards import output_names

    return json.loads((out / "_state" / f"{output_names([url])[url]}.json").read_text())


def table(out: Path, url: str):
    from pipeline.embedding.shards import stem

    return pq.read_table(out / "embeddings" / f"{stem(url)}.parquet")


def embeddings(out: Path, url: str) -> dict[str, np.ndarray]:
    t = table(out, url)
    return dict(zip(t.column("key").to_pylist(), store.embedding_matrix(t.column("embedding"))))


def test_run_exits_1_listing_exactly_the_failed_shards(faulty_run):
    urls, out, r = faulty_run
    assert r.exit_code == 1, r.output
    failing = {urls[n] for n, reason in SHARD_FAULTS.items() if reason is not None}
    assert {json.loads(p.read_text())["url"] for p in (out / "_state").glob("*.failed.json")} == failing
    for u in failing:
        assert f"  {u}: " in r.output
    assert f"{len(failing)} shard(s) failed" in r.output and not (out / "_SUCCESS").exists()
    assert not list(out.rglob("*.tmp")) and not (out / "_lock").exists()


@pytest.mark.parametrize("name", sorted(SKIPPED) + ["no_image_field"])
def test_bad_sample_skipped_with_reason_and_neighbours_embedded(faulty_run, name):
    urls, out, _ = faulty_run
    reason = SKIPPED[name][2] if name in SKIPPED else "no image field (has: txt"
    rec = record(out, urls[name])
    assert rec["seen"] == 3 and rec["embedded"] == 2
    assert len(rec["skipped"]) == 1 and rec["skipped"][0]["key"] == "fault" and reason in rec["skipped"][0]["reason"]
    emb = embeddings(out, urls[name])
    assert sorted(emb) == ["good_0", "good_1"] and all(np.isfinite(e).all() for e in emb.values())


@pytest.mark.parametrize("name", sorted(DECODED))
def test_odd_image_embedded_as_the_pixels_it_should_decode_to(faulty_run, name):
    urls, out, _ = faulty_run
    rec = record(out, urls[name])
    assert rec["skipped"] == [] and rec["embedded"] == rec["seen"]
    emb = embeddings(out, urls[name])
    assert {"good_0", "fault", "ref", "good_1"} <= set(emb)
    assert np.abs(emb["fault"] - emb["ref"]).max() < 1e-4, "decoded differently from the expected pixels"
    if "wrong" in emb:  # the naive decode (EXIF ignored, 16-bit clipped, transparency dropped) is another picture
        assert np.abs(emb["fault"] - emb["wrong"]).max() > 100 * max(np.abs(emb["fault"] - emb["ref"]).max(), 1e-6)


def test_duplicate_keys_first_kept_repeats_skipped(faulty_run):
    urls, out, _ = faulty_run
    rec = record(out, urls["duplicate_key"])
    assert rec["seen"] == 6 and rec["embedded"] == 4
    assert [s["key"] for s in rec["skipped"]] == ["good_0", "good_2"]
    assert all("duplicate key in shard" in s["reason"] for s in rec["skipped"])
    t = table(out, urls["duplicate_key"])
    assert t.column("key").to_pylist() == ["good_0", "good_1", "good_2", "good_3"]
    assert t.column("index").to_pylist() == [0, 1, 3, 5]  # the first good_0 kept, not its later twin


@pytest.mark.parametrize("name", sorted(SHARD_FAULTS))
def test_shard_fault_outcome(faulty_run, name):
    urls, out, _ = faulty_run
    from pipeline.embedding.shards import output_names

    stem = output_names([urls[name]])[urls[name]]
    failed = out / "_state" / f"{stem}.failed.json"
    if SHARD_FAULTS[name] is None:  # empty tar: done, zero rows, nothing failed
        assert not failed.exists() and record(out, urls[name])["embedded"] == 0 and table(out, urls[name]).num_rows == 0
        return
    assert SHARD_FAULTS[name] in json.loads(failed.read_text())["reason"]
    assert not (out / "_state" / f"{stem}.json").exists() and not (out / "embeddings" / f"{stem}.parquet").exists()


def test_rerun_retries_only_the_failed_shards_once_fixed(faulty_run, tmp_path):
    import shutil

    urls, out0, _ = faulty_run
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    root = Path(urls["tar_cut_mid_member"]).parent
    shutil.copyfile(root / "whole.tar", root / "tar_cut_mid_member.tar")  # the upload finished meanwhile
    again = CliRunner().invoke(cli, ["embed", urls["tar_cut_mid_member"], urls["truncated_jpeg"], "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "(1 already done, 0 failed)" in again.output
    assert table(out, urls["tar_cut_mid_member"]).column("key").to_pylist() == [f"good_{i}" for i in range(4)]
    assert not (out / "_state" / "tar_cut_mid_member.failed.json").exists()


def test_max_pixels_above_pils_own_limit_is_honoured():
    from PIL import Image as PILImage

    from pipeline.embedding.reader import ShardSamples
    from pipeline.model.image_header import SkipSample, read_header
    from pipeline.model.preprocess import Preprocess

    saved = PILImage.MAX_IMAGE_PIXELS
    try:
        ShardSamples([], Preprocess(), 8, max_pixels=200_000_000)
        assert PILImage.MAX_IMAGE_PIXELS == 200_000_000
        with pytest.raises(SkipSample, match=r"15000x15000 pixels, above the limit of 200000000 \(--max-pixels\)"):
            read_header(bomb_png_bytes(15_000, 15_000), 64, max_pixels=200_000_000)  # PIL alone: refused on open
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved
