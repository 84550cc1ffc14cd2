"""The decoder registry (model/decoders/): names, one signature, header checks before any decoder, per-sample skips,
and the main-process path (encoded bytes handed over by the workers) giving the same embeddings as the workers'."""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import store
from pipeline.embedding.options import EmbedConfig
from pipeline.embedding.reader import ShardSamples
from pipeline.embedding.run_folder import RunState
from pipeline.embedding.worker import iter_embedded, prepare_model
from pipeline.errors import UserError
from pipeline.model import decoders
from pipeline.model.decoders import cpu, decoder_names, get_decoder
from pipeline.model.image_header import Header, SkipSample, read_header
from pipeline.model.preprocess import Preprocess
import tiny
from shards import (bad_filter_png_bytes, fault_samples, jpeg_bytes, palette_png_bytes, png_bytes, sample_image,
                    write_tar)

PRE = Preprocess(input_size=32, resize_size=36)


@dataclass
class Recorder:
    """A test decoder: the cpu decoder's results, a skip for the keys' images in ``refuse``, and what it was given."""

    name: str
    in_workers: bool
    refuse: set[bytes] = field(default_factory=set)
    raise_on: set[bytes] = field(default_factory=set)
    error: Exception = RuntimeError("libfoo: bad data")
    seen: list[bytes] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def decode(self, data, headers, pre, device):
        self.seen.extend(data)
        self.calls.append(len(data))
        if self.raise_on & set(data):
            raise self.error
        out = cpu.DECODER.decode(data, headers, pre, device)
        return [SkipSample("refused by the test decoder") if d in self.refuse else r for d, r in zip(data, out)]


@pytest.fixture
def use(monkeypatch):
    """Register a decoder for this test only."""
    def put(decoder):
        monkeypatch.setitem(decoders.DECODERS.registered, decoder.name, decoder)
        return decoder
    return put


def test_unknown_decoder_is_a_user_error_listing_the_names():
    assert "cpu" in decoder_names()
    with pytest.raises(UserError, match=r"unknown decoder 'nvjpeg'; choose one of: .*cpu"):
        get_decoder("nvjpeg")
    with pytest.raises(UserError, match="unknown decoder"):
        ShardSamples([], PRE, 8, decoder="nvjpeg")  # refused before any shard is read


def test_every_decoder_has_the_one_signature():
    want = list(inspect.signature(decoders.Decoder.decode).parameters)
    for name in decoder_names():
        d = get_decoder(name)
        assert d.name == name and isinstance(d.in_workers, bool)
        assert list(inspect.signature(d.decode).parameters) == want[1:]  # (data, headers, pre, device)
    assert get_decoder("cpu").in_workers is True


def test_register_refuses_a_taken_name(use):
    with pytest.raises(UserError, match="'cpu' exists already"):
        decoders.register(Recorder("cpu", True))
    use(Recorder("other", True))
    assert "other" in decoder_names() and get_decoder("other").name == "other"


def test_cpu_decoder_gives_one_crop_or_skip_per_image_of_a_batch():
    images = [jpeg_bytes(sample_image((90, 70))), palette_png_bytes(), bad_filter_png_bytes(),
              jpeg_bytes(sample_image((400, 300)))]  # the last one DCT-scaled
    out = cpu.DECODER.decode(images, [read_header(d, PRE.resize_size) for d in images], PRE, torch.device("cpu"))
    assert [type(r).__name__ for r in out] == ["Tensor", "Tensor", "SkipSample", "Tensor"]
    assert all(r.shape == (3, 32, 32) and r.dtype == torch.uint8 for r in out if isinstance(r, torch.Tensor))
    assert str(out[2]).startswith("cannot decode PNG: ")


def test_header_record_crosses_processes_without_its_parse():
    h = read_header(png_bytes(sample_image((50, 40))), 36)
    assert (h.format, h.width, h.height, h.mode) == ("PNG", 50, 40, "RGB") and h.opened is not None
    back = pickle.loads(pickle.dumps(h))
    assert back == h and back.opened is None and back == Header("PNG", 50, 40, "RGB")


def shard_with_faults(root):
    """Every fault kind between good JPEGs, a PNG the decoder cannot decode (header fine), a large JPEG (DCT-scaled
    decode), a label that is not an integer (a warning) and kept text fields."""
    samples = fault_samples()
    samples += [{"__key__": "bad_filter", "png": bad_filter_png_bytes(), "cls": 1},
                {"__key__": "large", "jpg": jpeg_bytes(sample_image((400, 300), seed=3)), "cls": 2, "txt": "big"},
                {"__key__": "odd_label", "png": png_bytes(sample_image((60, 44), seed=4)), "cls": "x", "txt": "odd"}]
    return str(write_tar(root / "faults-000000.tar", samples)), samples


@pytest.mark.parametrize("in_workers", [True, False])
def test_a_header_failing_sample_never_reaches_the_decoder(tmp_path, use, in_workers):
    url, samples = shard_with_faults(tmp_path)
    rec = use(Recorder("recorder", in_workers))
    pieces = list(ShardSamples([url], PRE, 64, decoder="recorder"))
    if not in_workers:
        assert pieces[0].encoded and not len(pieces[0].images)
        pieces = [ShardSamples([url], PRE, 64, decoder="recorder").decode_encoded(p, torch.device("cpu"))
                  for p in pieces]
        assert rec.calls == [len(rec.seen)]  # the whole batch in one call
    (piece,) = pieces
    header_failing = {"bad_truncated", "bad_not_image", "bad_bomb"}
    by_key = {s["__key__"]: s for s in samples}
    assert not {by_key[k].get("jpg", by_key[k].get("png")) for k in header_failing} & set(rec.seen)
    assert len(rec.seen) == len(samples) - len(header_failing)
    reasons = dict(piece.skipped)
    assert reasons["bad_truncated"] == "truncated JPEG (no end-of-image marker after the last scan)"
    assert reasons["bad_not_image"] == "not a decodable image (unknown format)"
    assert reasons["bad_bomb"].startswith(("image claims 50000x50000 pixels", "decompression bomb refused"))
    assert reasons["bad_filter"].startswith("cannot decode PNG: ")
    assert set(reasons) == header_failing | {"bad_filter"}
    assert len(piece.keys) == len(piece.images) == len(samples) - 4


def test_a_skip_for_one_sample_of_a_main_process_batch_skips_only_it(tmp_path, use):
    url, samples = shard_with_faults(tmp_path)
    refused = next(s for s in samples if s["__key__"] == "odd_label")
    rec = use(Recorder("main", in_workers=False, refuse={refused["png"]}))
    data = ShardSamples([url], PRE, 64, keep=("txt",), decoder="main")
    (piece,) = [data.decode_encoded(p, torch.device("cpu")) for p in data]
    assert rec.calls == [len(samples) - 3]
    assert dict(piece.skipped)["odd_label"] == "refused by the test decoder"
    assert "odd_label" not in piece.keys and not piece.warnings  # its label warning went with it
    assert len(piece.keys) == len(piece.indices) == len(piece.labels) == len(piece.extra["txt"]) == len(piece.images)
    at = piece.keys.index("large")
    assert piece.indices[at] == len(samples) - 2 and piece.labels[at] == 2 and piece.extra["txt"][at] == "big"
    assert piece.encoded == [] and piece.headers == []


@pytest.mark.parametrize("error,skipped", [(RuntimeError("libfoo: bad data"), True), (MemoryError(), True),
                                           (TypeError("a bug of ours"), False)])
def test_a_batch_the_decoder_fails_on_is_retried_image_by_image(tmp_path, use, error, skipped):
    bad = png_bytes(sample_image((40, 30), seed=9))
    good = [jpeg_bytes(sample_image((48, 40), seed=i)) for i in range(2)]
    url = str(write_tar(tmp_path / "s.tar", [{"__key__": "good_0", "jpg": good[0]}, {"__key__": "bad", "png": bad},
                                             {"__key__": "good_1", "jpg": good[1]}]))
    rec = use(Recorder("flaky", in_workers=False, raise_on={bad}, error=error))
    data = ShardSamples([url], PRE, 8, decoder="flaky")
    if not skipped:
        with pytest.raises(TypeError, match="a bug of ours"):
            [data.decode_encoded(p, torch.device("cpu")) for p in data]
        return
    (piece,) = [data.decode_encoded(p, torch.device("cpu")) for p in data]
    assert rec.calls == [3, 1, 1, 1]
    assert piece.keys == ["good_0", "good_1"] and len(piece.images) == 2
    assert piece.skipped == [("bad", f"cannot decode: {type(error).__name__}: {error}")]


@pytest.fixture(scope="module")
def tiny_model():
    cfg = EmbedConfig(**tiny.options(workers=None, quiet=None), device="cpu", precision="fp32", out_dtype="float32",
                      batch_size=8, keep=("txt",))
    return cfg, *prepare_model(cfg)


def embed_rows(tiny_model, url, out, workers, decoder):
    cfg, bb, ex = tiny_model
    name = "faults-000000"
    ((_, rec, reason),) = list(iter_embedded([url], {url: name}, RunState(out), bb, ex, cfg, workers, decoder=decoder))
    assert reason is None
    t = pq.read_table(out / "embeddings" / f"{name}.parquet")
    return (t.column("key").to_pylist(), t.column("label").to_pylist(), t.column("txt").to_pylist(),
            store.embedding_matrix(t.column("embedding")), sorted(rec.skipped, key=str))


@pytest.mark.parametrize("workers", [0, 1])
def test_main_process_decoding_embeds_exactly_as_the_workers_do(tiny_model, tmp_path, use, workers):
    """The cpu decoder run in the main process (its images handed over encoded, headers pickled when ``workers``)
    gives the same rows, skips and embeddings as the cpu decoder in the workers."""
    url, _ = shard_with_faults(tmp_path)
    use(cpu.CpuDecoder(name="cpu-main", in_workers=False))
    ref = embed_rows(tiny_model, url, tmp_path / "in-workers", workers, "cpu")
    got = embed_rows(tiny_model, url, tmp_path / "main", workers, "cpu-main")
    assert got[:3] == ref[:3] and got[4] == ref[4]
    assert len(ref[0]) == len(fault_samples()) + 3 - 4 and len(ref[4]) == 4
    np.testing.assert_array_equal(got[3], ref[3])
