"""Real GPU tests (marked ``gpu``, skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them): the gpu decoder on
the device and its fallbacks, decode workers that never touch CUDA, the side streams and pinned buffers, the
measured batch size and decoder, and ``--devices cuda``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.embedding.reader import Piece
from pipeline.embedding.runner import embed
from pipeline.model.backbones import load_backbone
from pipeline.model.compile import build_extractor
from pipeline.model.decode_choice import choose_decoder
from pipeline.model.decoders import cpu, decoder_names, get_decoder
from pipeline.model.image_header import Header, SkipSample, read_header
from pipeline.model.preprocess import Preprocess
from pipeline.model.streams import StreamedEmbedder
from pipeline.model.tuning import BATCH_CANDIDATES, tuned_extractor
import tiny
from shards import cmyk_jpeg_bytes, exif_rotated_jpeg_bytes, grayscale_jpeg_bytes, jpeg_bytes, png_bytes, sample_image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
PRE = Preprocess(input_size=96, resize_size=110)


def headers(data):
    return [Header(h.format, h.width, h.height, h.mode) for h in (read_header(d, PRE.resize_size) for d in data)]


def garbled_jpeg():
    good = jpeg_bytes(sample_image((90, 70), seed=1))
    sos = good.find(b"\xff\xda")
    return good[:sos + 20] + bytes(range(256)) * 3 + good[sos + 20 + 768:]


def test_gpu_decoder_on_the_device_matches_the_cpu_decoder_and_hands_it_what_nvjpeg_refuses():
    jpegs = [jpeg_bytes(sample_image((500, 375), seed=i)) for i in range(6)]
    odd = [grayscale_jpeg_bytes((200, 150)), jpeg_bytes(sample_image((300, 200), seed=9), progressive=True),
           exif_rotated_jpeg_bytes((200, 120))]
    fallback = [png_bytes(sample_image((120, 90), seed=3)), cmyk_jpeg_bytes((160, 120))]
    data = jpegs + odd + fallback
    out = get_decoder("gpu").decode(data, headers(data), PRE, CUDA)
    ref = cpu.DECODER.decode(data, headers(data), PRE, torch.device("cpu"))
    for got, want in zip(out, ref):
        assert got.device.type == "cuda" and got.shape == (3, 96, 96) and got.dtype == torch.uint8
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: close, not equal
        assert (got.cpu().float() - want.float()).abs().mean() < 3.0
    for got, want in zip(out[-2:], ref[-2:]):
        assert torch.equal(got.cpu(), want)  # decoded by the cpu decoder itself


def test_a_jpeg_the_device_cannot_decode_costs_only_itself():
    good = [jpeg_bytes(sample_image((200, 150), seed=i)) for i in range(7)]
    data = good[:3] + [garbled_jpeg()] + good[3:]
    out = get_decoder("gpu").decode(data, headers(data), PRE, CUDA)
    assert all(isinstance(r, torch.Tensor) and r.is_cuda for j, r in enumerate(out) if j != 3)
    want = cpu.DECODER.decode([data[3]], headers([data[3]]), PRE, torch.device("cpu"))[0]
    if isinstance(out[3], SkipSample):  # nvJPEG refused it: the cpu decoder's record
        assert str(out[3]) == str(want)


@pytest.mark.parametrize("workers", [0, 4])
def test_decode_gpu_on_cuda_with_forked_workers_embeds_as_the_cpu_decoder_does(photo_shards, tmp_path, workers):
    """The workers fork after CUDA is initialised here: one that touched CUDA would fail the run. The pretrained
    default backbone gives the same embeddings from both decoders to a cosine of 0.99."""
    urls = [str(p) for p in photo_shards]
    opts = dict(model="default", device="cuda", quiet=True, workers=workers, out_dtype="float32")
    a = embed(urls, tmp_path / "cpu", decode="cpu", **opts)
    b = embed(urls, tmp_path / "gpu", decode="gpu", **opts)
    assert not a.failed and not b.failed and a.embedded == b.embedded == 54
    x, y = store.read_all(tmp_path / "cpu"), store.read_all(tmp_path / "gpu")
    assert list(x.keys) == list(y.keys)
    assert (x.embeddings * y.embeddings).sum(1).min() >= 0.99


def test_the_streamed_embedder_returns_before_the_device_finishes_and_gives_the_synchronous_embeddings():
    bb = load_backbone(tiny.MODEL, "none", input_size=64)
    ex = build_extractor(bb, "cuda", "fp32", "eager", micro_batch=0)
    run = StreamedEmbedder(ex, True, "float32")
    x = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
    piece = Piece("u", x.clone()).pin_memory()
    assert piece.images.is_pinned()
    want = torch.nn.functional.normalize(ex(x.cuda()), dim=1).cpu().numpy()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued before the batch
    pending = run.submit(piece.images)
    assert not pending.copied.query()  # submit returned while the device was still busy
    np.testing.assert_allclose(pending.result(), want, rtol=1e-5, atol=1e-5)
    assert pending.copied.query() and pending.host.is_pinned()


def test_the_gpu_batch_size_is_measured_once_and_remembered(tmp_path):
    bb = load_backbone(tiny.MODEL, "none", input_size=64)
    ex = tuned_extractor(bb, "cuda", "fp16", "eager", tmp_path)
    assert ex.batch_size in BATCH_CANDIDATES and (tmp_path / "batch_size.json").is_file()
    again = tuned_extractor(bb, "cuda", "fp16", "eager", tmp_path)
    assert again.batch_size == ex.batch_size
    assert choose_decoder("auto", bb, ex, 4, tmp_path) in decoder_names()
    assert (tmp_path / "decode.json").is_file()


@pytest.mark.parametrize("devices", ["cuda", "cuda:0,cuda:0"])
def test_devices_cuda_embeds_every_shard_as_one_gpu_does(digits_shards, tmp_path, devices):
    """One process per entry (``cuda:0,cuda:0``: two on one GPU, so the engine runs with a single GPU too)."""
    urls = [str(p) for p in digits_shards]
    opts = tiny.options(compile="torchscript", out_dtype="float32", workers=2, quiet=True)
    one = embed(urls, tmp_path / "one", device="cuda:0", **opts)
    many = embed(urls, tmp_path / "many", devices=devices, decode="gpu", **opts)
    assert not one.failed and not many.failed and many.embedded == one.embedded == 300
    a, b = store.read_all(tmp_path / "one"), store.read_all(tmp_path / "many")
    assert list(a.keys) == list(b.keys)
    assert (a.embeddings * b.embeddings).sum(1).min() >= 0.99
