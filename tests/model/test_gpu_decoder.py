"""The ``gpu`` decoder (model/decoders/gpu.py) run on CPU tensors: one batched decode_jpeg call per batch, EXIF
orientation read without PIL, the batched resize + crop, every image it cannot decode given to the cpu decoder
alone with the cpu decoder's record, and embeddings as close to the cpu decoder's as its rounding allows."""
from __future__ import annotations

import io
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from pipeline import store
from pipeline.embedding.options import EmbedConfig
from pipeline.embedding.run_folder import RunState
from pipeline.embedding.runner import embed
from pipeline.embedding.worker import iter_embedded, prepare_model
from pipeline.model.decoders import cpu, get_decoder, gpu
from pipeline.model.image_header import Header, SkipSample, read_header
from pipeline.model.orientation import jpeg_orientation, oriented
from pipeline.model.preprocess import Preprocess, resize_crop, resize_crop_batch
import tiny
from shards import (bad_filter_png_bytes, cmyk_jpeg_bytes, fault_samples, grayscale_jpeg_bytes, jpeg_bytes,
                    palette_png_bytes, png_bytes, sample_image, write_tar)

PRE = Preprocess(input_size=32, resize_size=36)
CPU = torch.device("cpu")
GPU = get_decoder("gpu")


def headers(data):
    """Headers as the workers send them: checked, without PIL's parse (it does not cross processes)."""
    return [Header(h.format, h.width, h.height, h.mode) for h in (read_header(d, PRE.resize_size) for d in data)]


def cpu_results(data, pre=PRE):
    return cpu.DECODER.decode(data, headers(data), pre, CPU)


def garbled_jpeg():
    """A JPEG whose header passes the checks (ends with its end-of-image marker) but whose scan data is garbage:
    libjpeg and PIL both refuse it."""
    good = jpeg_bytes(sample_image((90, 70), seed=1))
    sos = good.find(b"\xff\xda")
    return good[:sos + 20] + bytes(range(256)) * 3 + good[sos + 20 + 768:]


def with_orientation(data: bytes, value: int, order: str = "II") -> bytes:
    """``data`` (a JPEG) with an Exif APP1 segment whose IFD0 holds only Orientation = ``value``."""
    fmt = "<" if order == "II" else ">"
    tiff = order.encode() + struct.pack(fmt + "HI", 42, 8) + struct.pack(fmt + "H", 1)
    tiff += struct.pack(fmt + "HHI", 0x0112, 3, 1) + struct.pack(fmt + "HH", value, 0) + struct.pack(fmt + "I", 0)
    body = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[2:]


@pytest.fixture
def calls(monkeypatch):
    """The sizes of the batches handed to torchvision's decode_jpeg (the real function still decodes them)."""
    seen: list[int] = []
    real = gpu.decode_jpeg

    def counted(tensors, **kw):
        seen.append(len(tensors))
        return real(tensors, **kw)

    monkeypatch.setattr(gpu, "decode_jpeg", counted)
    return seen


def test_a_batch_of_jpegs_is_one_call_and_the_others_go_to_the_cpu_decoder(calls):
    jpegs = [jpeg_bytes(sample_image((90 + 10 * i, 70), seed=i)) for i in range(5)]
    gray, prog = grayscale_jpeg_bytes(), jpeg_bytes(sample_image((80, 60), seed=7), progressive=True)
    others = [png_bytes(sample_image((50, 40), seed=8)), cmyk_jpeg_bytes(), palette_png_bytes()]
    data = jpegs[:2] + [others[0], gray] + jpegs[2:] + [others[1], prog, others[2]]
    out = GPU.decode(data, headers(data), PRE, CPU)
    assert calls == [len(jpegs) + 2]  # every RGB or grayscale JPEG, progressive too, in one call
    ref = cpu_results(data)
    for got, want, d in zip(out, ref, data):
        assert got.shape == (3, 32, 32) and got.dtype == torch.uint8 and got.device == CPU
        if d in others:  # decoded by the cpu decoder itself
            assert torch.equal(got, want)
        else:  # the same pixels, resized in float32 and rounded
            assert (got.int() - want.int()).abs().max() <= 2


def test_an_image_the_batched_call_refuses_costs_only_itself(calls):
    good = [jpeg_bytes(sample_image((60, 50), seed=i)) for i in range(7)]
    bad = garbled_jpeg()
    data = good[:5] + [bad] + good[5:]
    out = GPU.decode(data, headers(data), PRE, CPU)
    # the refused batch is halved until the bad image is alone: 8 -> 4 + 4 -> 2 + 2 -> 1 + 1
    assert calls[0] == 8 and calls.count(1) == 2 and len(calls) == 7
    assert sum(n for n in calls if n <= 4) == 8 + 4 + 2  # every image decoded by the device call but the bad one
    want = cpu_results([bad])[0]
    assert isinstance(out[5], SkipSample) and str(out[5]) == str(want)  # the cpu decoder's own record
    assert str(out[5]).startswith("cannot decode JPEG: ")
    assert all(isinstance(r, torch.Tensor) for j, r in enumerate(out) if j != 5)


def test_images_neither_decoder_can_read_are_skipped_with_the_cpu_decoders_reasons():
    data = [bad_filter_png_bytes(), garbled_jpeg(), jpeg_bytes(sample_image((40, 40)))]
    out = GPU.decode(data, headers(data), PRE, CPU)
    want = cpu_results(data)
    assert [str(r) for r in out[:2]] == [str(r) for r in want[:2]]
    assert str(out[0]).startswith("cannot decode PNG: ") and isinstance(out[2], torch.Tensor)


@pytest.mark.parametrize("value", range(1, 9))
def test_exif_orientation_is_read_and_applied_as_pil_does(value):
    stored = with_orientation(jpeg_bytes(sample_image((60, 40), seed=value)), value)
    im = Image.open(io.BytesIO(stored))
    assert jpeg_orientation(stored) == im.getexif().get(0x0112) == value
    upright = torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(2, 0, 1)
    raw = torch.from_numpy(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(oriented(raw, value), upright)
    (got,), (want,) = GPU.decode([stored], headers([stored]), PRE, CPU), cpu_results([stored])
    assert (got.int() - want.int()).abs().max() <= 2  # turned upright before the resize, as the cpu decoder does


def test_orientation_reader_takes_both_byte_orders_and_never_fails_on_odd_headers():
    base = jpeg_bytes(sample_image((30, 20)))
    assert jpeg_orientation(with_orientation(base, 6, "MM")) == 6 == Image.open(
        io.BytesIO(with_orientation(base, 6, "MM"))).getexif().get(0x0112)
    assert jpeg_orientation(base) == 1  # no Exif segment
    cut = with_orientation(base, 8)
    assert jpeg_orientation(cut[:30]) == 1 and jpeg_orientation(b"") == 1 and jpeg_orientation(b"\x89PNG") == 1
    assert jpeg_orientation(with_orientation(base, 9)) == 1  # not an orientation value


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_batched_resize_crop_is_torchvisions_float_resize_and_close_to_the_one_image_resize(interpolation):
    pre = Preprocess(input_size=48, resize_size=56, interpolation=interpolation)
    mode = TF.InterpolationMode(interpolation)
    sizes = [(90, 70), (70, 90), (90, 70), (56, 56), (200, 150), (90, 70)]
    images = [torch.from_numpy(sample_image(s, seed=i)).permute(2, 0, 1).contiguous() for i, s in enumerate(sizes)]
    got = resize_crop_batch(images, pre, chunk=2)  # groups of one size, split in chunks
    for g, img in zip(got, images):
        # what torchvision computes for a uint8 image on a GPU (float32, then rounded), exactly
        on_gpu = TF.resize(img.float(), [56], interpolation=mode, antialias=True).clamp(0, 255).round()
        assert torch.equal(g, TF.center_crop(on_gpu, [48, 48]).to(torch.uint8))
        want = resize_crop(img, pre)  # the cpu decoder's uint8 kernel
        assert g.shape == want.shape == (3, 48, 48) and g.dtype == torch.uint8
        diff = (g.int() - want.int()).abs()
        if interpolation == "bilinear":
            assert diff.max() <= 1
        else:  # the uint8 kernel clamps bicubic's overshoot at hard edges between its two passes
            assert (diff <= 1).float().mean() > 0.99
    assert torch.equal(got[3], resize_crop(images[3], pre))  # already at the resize size: only cropped


def shard_with_faults(root):
    samples = fault_samples() + [
        {"__key__": "bad_filter", "png": bad_filter_png_bytes(), "cls": 1},
        {"__key__": "garbled", "jpg": garbled_jpeg(), "cls": 1},
        {"__key__": "large", "jpg": jpeg_bytes(sample_image((400, 300), seed=3)), "cls": 2, "txt": "big"},
        {"__key__": "rotated", "jpg": with_orientation(jpeg_bytes(sample_image((64, 40), seed=5)), 8), "cls": 3}]
    return str(write_tar(root / "faults-000000.tar", samples))


@pytest.fixture(scope="module")
def tiny_model():
    cfg = EmbedConfig(**tiny.options(workers=None, quiet=None), device="cpu", precision="fp32", out_dtype="float32",
                      batch_size=8, keep=("txt",))
    return cfg, *prepare_model(cfg)


def rows(tiny_model, url, out, workers, decoder):
    cfg, bb, ex = tiny_model
    ((_, rec, reason),) = list(iter_embedded([url], {url: "faults-000000"}, RunState(out), bb, ex, cfg, workers,
                                             decoder=decoder))
    assert reason is None
    t = pq.read_table(out / "embeddings" / "faults-000000.parquet")
    done = json.loads((out / "_state" / "faults-000000.json").read_text())  # the done record
    return (t.column("key").to_pylist(), t.column("label").to_pylist(), t.column("txt").to_pylist(),
            store.embedding_matrix(t.column("embedding")), done["skipped"], done["warnings"], rec.seen)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decoder_run_keeps_the_rows_skips_and_records_of_the_cpu_decoder(tiny_model, tmp_path, workers):
    url = shard_with_faults(tmp_path)
    ref = rows(tiny_model, url, tmp_path / "cpu", workers, "cpu")
    got = rows(tiny_model, url, tmp_path / "gpu", workers, "gpu")
    assert got[:3] == ref[:3] and got[4:] == ref[4:]
    skipped = {r["key"]: r["reason"] for r in got[4]}
    assert skipped["garbled"].startswith("cannot decode JPEG: ") and "rotated" in got[0] and "large" in got[0]
    cos = (got[3] * ref[3]).sum(1) / np.linalg.norm(got[3], axis=1) / np.linalg.norm(ref[3], axis=1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_gpu_decoder_embeds_real_photos_as_the_cpu_decoder_does_with_the_default_model(photo_shards, tmp_path):
    """The pretrained default backbone on real photos (JPEG and PNG): the two decoders' embeddings of every
    sample agree to a cosine of 0.99 (the CPU fidelity of the GPU path; gpu_check reports it on a GPU)."""
    urls = [str(p) for p in photo_shards]
    opts = dict(model="default", device="cpu", out_dtype="float32", quiet=True, workers=0)
    embed(urls, tmp_path / "cpu", decode="cpu", **opts)
    embed(urls, tmp_path / "gpu", decode="gpu", **opts)
    a, b = store.read_all(tmp_path / "cpu"), store.read_all(tmp_path / "gpu")
    assert list(a.keys) == list(b.keys) and len(a.keys) == 54
    cos = (a.embeddings * b.embeddings).sum(1)  # both L2-normalised
    assert cos.min() >= 0.99, cos.min()
