"""Single samples that used to abort a whole run (issue 16, items 1-5), each between two good JPEGs in its shard.

One `embedpipe embed` over all of them: it exits 0 without a traceback, every good sample of every shard is
embedded, and each hostile sample is either skipped or stored with a recorded reason.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import store
from pipeline.cli import cli
from pipeline.model.decoders.cpu import decode_rgb
from pipeline.model.image_header import SkipSample, read_header
from pipeline.verify import run_verify
from shards import (bad_filter_png_bytes, jpeg_bytes, png16_rgb_bytes, png_bytes, sample_image, wide_png_bytes,
                    write_raw_tar, write_tar)
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


ARGS = tiny.cli_args(out_dtype="float32", batch_size=16)
GOOD = ["good_0", "good_1"]


def good(i: int) -> dict:
    return {"__key__": f"good_{i}", "jpg": jpeg_bytes(sample_image((56, 44), seed=200 + i)), "cls": i}


def between(root: Path, name: str, bad: dict) -> str:
    return str(write_tar(root / f"{name}.tar", [good(0), bad, good(1)]))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    png16 = png16_rgb_bytes()
    top_byte = png_bytes(np.asarray(Image.open(io.BytesIO(png16)).convert("RGB")))  # what it must decode to
    urls = {
        "filter_byte_7": between(root, "filter_byte_7", {"__key__": "bad", "png": bad_filter_png_bytes()}),
        "png_16_bit_rgb": str(write_tar(root / "png_16_bit_rgb.tar", [good(0), {"__key__": "bad", "png": png16},
                                                                      {"__key__": "ref", "png": top_byte}, good(1)])),
        "label_20_digits": between(root, "label_20_digits", {**good(5), "__key__": "bad", "cls": "99999999999999999999"}),
        "label_2_pow_63": between(root, "label_2_pow_63", {**good(6), "__key__": "bad", "cls": str(2**63)}),
        "wide_1000000x1": between(root, "wide_1000000x1", {"__key__": "bad", "png": wide_png_bytes(1_000_000, 1)}),
        "name_not_utf8": str(write_raw_tar(root / "name_not_utf8.tar", [
            (b"good_0.jpg", good(0)["jpg"]), (b"bad_\xff.jpg", good(7)["jpg"]), (b"bad_\xff.cls", b"7"),
            (b"good_1.jpg", good(1)["jpg"])])),
    }
    out = root / "out"
    r = CliRunner().invoke(cli, ["embed", *urls.values(), "--out", str(out), *ARGS])
    return urls, out, r


def record(out: Path, name: str) -> dict:
    return json.loads((out / "_state" / f"{name}.json").read_text())


def table(out: Path, name: str):
    return pq.read_table(out / "embeddings" / f"{name}.parquet")


def test_the_run_completes_every_shard_without_a_traceback(hostile_run):
    urls, out, r = hostile_run
    assert r.exit_code == 0, r.output
    assert r.exception is None and "Traceback" not in r.output
    assert f"from {len(urls)}/{len(urls)} shards (0 already done, 0 failed)" in r.output
    assert (out / "_SUCCESS").is_file() and not (out / "_lock").exists() and not list(out.rglob("*.claim"))
    assert run_verify(out)[0] == []
    for name in urls:  # every good sample of every shard, once
        keys = table(out, name).column("key").to_pylist()
        assert [k for k in keys if k.startswith("good")] == GOOD and len(keys) == len(set(keys))


@pytest.mark.parametrize("name,reason", [
    ("filter_byte_7", "cannot decode PNG"),  # libpng would segfault: PIL's decoder refuses it with an error
    ("wide_1000000x1", "image is 1000000x1: resizing its shorter side to 73 px would make it 73000000x73 pixels"),
])
def test_undecodable_sample_skipped_with_its_reason(hostile_run, name, reason):
    _, out, _ = hostile_run
    rec = record(out, name)
    assert rec["seen"] == 3 and rec["embedded"] == 2
    assert [s["key"] for s in rec["skipped"]] == ["bad"] and reason in rec["skipped"][0]["reason"]


def test_16_bit_rgb_png_embedded_as_its_top_bytes(hostile_run):
    _, out, _ = hostile_run
    t = table(out, "png_16_bit_rgb")
    emb = dict(zip(t.column("key").to_pylist(), store.embedding_matrix(t.column("embedding"))))
    assert record(out, "png_16_bit_rgb")["skipped"] == [] and set(emb) == {"good_0", "bad", "ref", "good_1"}
    assert np.abs(emb["bad"] - emb["ref"]).max() < 1e-5


@pytest.mark.parametrize("name,value", [("label_20_digits", "99999999999999999999"),
                                        ("label_2_pow_63", "9223372036854775808")])
def test_label_beyond_int64_stored_as_null_with_a_reason(hostile_run, name, value):
    _, out, _ = hostile_run
    t = table(out, name)
    labels = dict(zip(t.column("key").to_pylist(), t.column("label").to_pylist()))
    assert labels == {"good_0": 0, "bad": None, "good_1": 1}
    assert record(out, name)["warnings"] == [
        {"key": "bad", "reason": f"cls {value} does not fit a 64-bit label; label stored as null"}]


def test_key_that_is_not_utf8_kept_escaped_with_its_bytes_recorded(hostile_run):
    _, out, _ = hostile_run
    t = table(out, "name_not_utf8")
    assert t.column("key").to_pylist() == ["good_0", "bad_\\xff", "good_1"]
    assert t.column("label").to_pylist() == [None, 7, None]
    assert record(out, "name_not_utf8")["warnings"] == [
        {"key": "bad_\\xff", "reason": "key is not valid UTF-8 (b'bad_\\xff'); stored escaped"}]


def test_decoder_bounds_memory_from_the_header():
    with pytest.raises(SkipSample, match="200000x1: resizing its shorter side to 256 px"):
        read_header(wide_png_bytes(200_000, 1), 256)
    affordable = wide_png_bytes(500, 1)  # 128000x256 once resized
    assert decode_rgb(affordable, read_header(affordable, 256), 256).shape == (3, 1, 500)


@pytest.mark.slow
def test_peak_memory_of_a_run_over_the_wide_png_stays_flat(hostile_run, tmp_path):
    """The 1000000x1 PNG used to ask for 16 GB; the whole process now stays near a plain run's ~1 GB."""
    urls, _, _ = hostile_run
    code = ("import atexit, resource, sys; atexit.register(lambda: print('maxrss', resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); from pipeline.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "embed", urls["wide_1000000x1"], "--out", str(tmp_path / "o"),
                        *ARGS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kb = int(r.stderr.split("maxrss")[-1].split()[0])
    assert peak_kb < 2_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB"


@pytest.mark.parametrize("error,skipped", [(RuntimeError("libfoo: bad data"), True), (MemoryError(), True),
                                           (TypeError("a bug of ours"), False)])
def test_any_decoder_error_skips_its_sample_but_a_programming_error_stops(tmp_path, monkeypatch, error, skipped):
    from pipeline.embedding import reader
    from pipeline.model.decoders import cpu
    from pipeline.model.preprocess import Preprocess

    # A PNG whose header passes the checks, so the error comes from the decoder itself.
    url = between(tmp_path, "s", {"__key__": "bad", "png": png_bytes(sample_image((40, 30), seed=9))})
    real = cpu.decode_rgb

    def decode(data, header, target_short):
        if header.format == "PNG":
            raise error
        return real(data, header, target_short)

    monkeypatch.setattr(cpu, "decode_rgb", decode)  # the function the cpu decoder calls for each image
    pieces = reader.ShardSamples([url], Preprocess(input_size=32, resize_size=36), 8)
    if not skipped:
        with pytest.raises(TypeError, match="a bug of ours"):
            list(pieces)
        return
    (piece,) = list(pieces)
    assert piece.keys == GOOD and piece.failed is None
    assert piece.skipped == [("bad", f"cannot decode: {type(error).__name__}: {error}")]
