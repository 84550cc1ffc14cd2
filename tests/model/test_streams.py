"""The loop that keeps a GPU busy (model/streams.py, embedding/feed.py), run through its CPU equivalents: the
streamed embedder gives exactly the synchronous embeddings, a batch's embeddings are read only once the next batch
is queued, device decoding runs a batch ahead in its own thread, in order, and a whole run gives exactly the
embeddings of one synchronous call per batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.embedding.feed import decoded_ahead, embedded
from pipeline.embedding.options import EmbedConfig
from pipeline.embedding.reader import Piece, ShardSamples
from pipeline.embedding.run_folder import RunState
from pipeline.embedding.worker import iter_embedded, prepare_model
from pipeline.model import decoders
from pipeline.model.decoders import cpu
from pipeline.model.streams import StreamedEmbedder, Streams
import tiny
from shards import jpeg_bytes, png_bytes, sample_image, write_tar

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    cfg = EmbedConfig(**tiny.options(quiet=None), device="cpu", precision="fp32", out_dtype="float32", batch_size=8)
    return cfg, *prepare_model(cfg)


def synchronous(ex, images, normalize, dtype):
    """What Extractor.embed computed before the streams: the forward pass, then one copy to the host per batch."""
    feats = ex(images)
    if normalize:
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats.cpu().numpy().astype(dtype)


@pytest.mark.parametrize("normalize,dtype", [(True, "float16"), (False, "float32"), (True, "float32")])
def test_streamed_embeddings_are_exactly_the_synchronous_ones(model, normalize, dtype):
    _, _, ex = model
    run = StreamedEmbedder(ex, normalize, dtype)
    batches = [torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
               for n in (8, 8, 3)]
    pending = [run.submit(b) for b in batches]  # all queued before any is read
    for p, b in zip(pending, batches):
        got = p.result()
        assert got.dtype == np.dtype(dtype) and got.shape == (len(b), 512)
        np.testing.assert_array_equal(got, synchronous(ex, b, normalize, dtype))


class Logged:
    """A StreamedEmbedder that logs when each batch is queued and when its embeddings are read."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def submit(self, images, ready=None):
        i = sum(1 for e in self.log if e[0] == "submit")
        self.log.append(("submit", i))
        pending, log = self.inner.submit(images, ready), self.log

        class Read:
            def result(self):
                log.append(("read", i))
                return pending.result()
        return Read()


def piece(url, n, end=False):
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    return Piece(url, images, keys=[f"{url}-{i}" for i in range(n)], indices=list(range(n)), end=end)


def test_a_batchs_embeddings_are_read_after_the_next_batch_is_queued_and_in_order(model):
    _, _, ex = model
    run = Logged(StreamedEmbedder(ex, True, "float32"))
    pieces = [piece("a", 4), piece("a", 0, end=True), piece("b", 3), piece("b", 2, end=True)]
    out = list(embedded(((p, None) for p in pieces), run))
    assert [p for p, _ in out] == pieces  # the same pieces, in order, the empty one too
    assert out[1][1] is None and [len(e) for p, e in out if e is not None] == [4, 3, 2]
    assert run.log == [("submit", 0), ("submit", 1), ("read", 0), ("submit", 2), ("read", 1), ("read", 2)]


def test_device_decoding_runs_one_piece_ahead_in_its_own_thread_in_order(tmp_path, monkeypatch):
    decoded_by: list[str] = []

    class MainProcess(cpu.CpuDecoder):
        def decode(self, data, headers, pre, device):
            decoded_by.append(threading.current_thread().name)
            return super().decode(data, headers, pre, device)

    monkeypatch.setitem(decoders.DECODERS.registered, "main-test", MainProcess(name="main-test", in_workers=False))
    url = str(write_tar(tmp_path / "s.tar", [{"__key__": f"k{i}", "jpg" if i % 3 else "png": (
        jpeg_bytes if i % 3 else png_bytes)(sample_image((40, 30), seed=i))} for i in range(10)]))
    data = ShardSamples([url], tiny_pre(), 4, decoder="main-test")
    raw = list(data)  # encoded pieces (4, 4, 2 + the end)
    assert [len(p.encoded) for p in raw] == [4, 4, 2]
    got = list(decoded_ahead(iter(raw), data, Streams(CPU)))
    assert [p.keys for p, _ in got] == [[f"k{i}" for i in range(j, min(j + 4, 10))] for j in (0, 4, 8)]
    assert all(len(p.images) == len(p.keys) and not p.encoded for p, _ in got)
    assert decoded_by and all(name.startswith("device-decode") for name in decoded_by)


def test_a_bug_in_a_device_decoder_reaches_the_caller(tmp_path, monkeypatch):
    class Broken(cpu.CpuDecoder):
        def decode(self, data, headers, pre, device):
            raise TypeError("a bug of ours")

    monkeypatch.setitem(decoders.DECODERS.registered, "broken", Broken(name="broken", in_workers=False))
    url = str(write_tar(tmp_path / "s.tar", [{"__key__": "a", "jpg": jpeg_bytes(sample_image((40, 30)))}]))
    data = ShardSamples([url], tiny_pre(), 4, decoder="broken")
    with pytest.raises(TypeError, match="a bug of ours"):
        list(decoded_ahead(iter(data), data, Streams(CPU)))


def tiny_pre():
    from pipeline.model.preprocess import Preprocess

    return Preprocess(input_size=64, resize_size=73)


@pytest.mark.parametrize("decoder", ["cpu", "gpu"])
def test_a_run_gives_exactly_the_embeddings_of_one_synchronous_call_per_batch(model, digits_shards, tmp_path, decoder):
    """The whole loop (decode ahead, one batch in flight, commits) changes no value: each shard's rows are the
    synchronous embeddings of its batches, batch by batch, as the reader cuts them."""
    cfg, bb, ex = model
    urls = [str(p) for p in digits_shards[:2]]
    names = {u: f"digits-{i:06d}" for i, u in enumerate(urls)}
    done = list(iter_embedded(urls, names, RunState(tmp_path), bb, ex, cfg, 0, decoder=decoder))
    assert [u for u, _, _ in done] == urls
    data = ShardSamples(urls, bb.preprocess, cfg.batch_size, decoder=decoder)
    want: dict[str, list[np.ndarray]] = {u: [] for u in urls}
    for p in data:
        if p.encoded:
            p = data.decode_encoded(p, CPU)
        if len(p.keys):
            want[p.url].append(synchronous(ex, p.images, True, "float32"))
    for u in urls:
        got = store.read_all(tmp_path, files=[tmp_path / "embeddings" / f"{names[u]}.parquet"]).embeddings
        np.testing.assert_array_equal(got, np.concatenate(want[u]))


def test_a_shard_being_collected_holds_its_rows_not_their_pixels():
    """Until a shard's last piece arrives its rows wait in a buffer; their images (pinned memory, or the GPU's
    with --decode gpu) are not kept there: 16 workers with a shard each would hold 16 shards of pixels."""
    from pipeline.embedding.worker import _ShardBuffer

    buf = _ShardBuffer()
    p = piece("a", 8)
    buf.add(p, np.zeros((8, 4), dtype=np.float32))
    ((held, emb),) = buf.pieces
    assert held.keys == p.keys and emb.shape == (8, 4)
    assert held.images.numel() == 0
