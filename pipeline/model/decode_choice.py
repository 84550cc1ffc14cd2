"""``--decode``: a decoder of the registry by name, or ``auto``: on a CPU device the default decoder, on a GPU the
decoder that feeds this model fastest here, measured once per machine and model and remembered
(``measured.py``). No decoder is named here: every registered one is a candidate, and where it runs (``in_workers``)
says how its rate combines with the model's.
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..sample_data import PHOTOS, load_photo
from . import measured
from .backbones import Backbone
from .compile import Extractor, cache_key, default_cache_dir
from .decoders import DEFAULT_DECODER, Decoder, decoder_names, get_decoder
from .image_header import Header, read_header
from .preprocess import Preprocess
from .streams import StreamedEmbedder
from .tuning import images_per_s

log = logging.getLogger(__name__)
DECODE_AUTO = "auto"
DECODE_CHOICES = (DECODE_AUTO, *decoder_names())
_warned: set[str] = set()


def probe_jpegs(n: int = 128, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of ``size`` cut from the packaged photos (the shards ``embedpipe bench`` makes look alike)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [p for p in (load_photo(name) for name in PHOTOS) if min(p.size) >= 300]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=int(rng.integers(85, 97)))
        out.append(buf.getvalue())
    return out


def measure_decoders(ex: Extractor, pre: Preprocess, workers: int, images: list[bytes],
                     seconds: float = 1.0) -> dict[str, float]:
    """Each registered decoder's images per second end to end with ``ex`` (decode, resize, crop, the model).

    A decoder that runs in the workers decodes in parallel with the model: its rate is the lesser of ``workers``
    threads decoding and the model alone. One that runs in the main process shares the device with the model:
    its rate is measured with both, as the embed loop runs them (:func:`_main_process_rate`).
    """
    batch = ex.batch_size or len(images)
    images = (images * (batch // len(images) + 1))[:max(batch, len(images))]
    x = torch.randint(0, 256, (batch, 3, pre.input_size, pre.input_size), dtype=torch.uint8, device=ex.device)
    ex(x)
    r_m = images_per_s(ex, x, seconds)
    rates: dict[str, float] = {"model alone": r_m}
    for name in decoder_names():
        decoder = get_decoder(name)

        def one_batch(data: list[bytes]) -> list:
            return decoder.decode(data, [read_header(d, pre.resize_size) for d in data], pre, ex.device)

        if decoder.in_workers:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                list(pool.map(lambda d: one_batch([d]), images[:max(1, workers)]))  # threads started
                t0 = time.perf_counter()
                list(pool.map(lambda d: one_batch([d]), images))
                decode = len(images) / (time.perf_counter() - t0)
            rates[name] = min(decode, r_m)
            continue
        rates[name] = _main_process_rate(decoder, ex, pre, images[:batch], seconds)
    return rates


def _main_process_rate(decoder: Decoder, ex: Extractor, pre: Preprocess, data: list[bytes], seconds: float) -> float:
    """Images per second of a main-process decoder and the model as the embed loop runs them: each batch decoded
    in a thread on the decode stream, a batch ahead; its embeddings read a batch behind (``embedding/feed.py``)."""
    # The workers check headers in parallel and send them without PIL's parse: so here, outside the clock.
    headers = [Header(h.format, h.width, h.height, h.mode) for h in (read_header(d, pre.resize_size) for d in data)]
    run = StreamedEmbedder(ex, True, "float16")
    streams = run.streams

    def decoded() -> tuple[torch.Tensor, object]:
        with streams.on(streams.decode):
            crops = decoder.decode(data, headers, pre, ex.device)
            return torch.stack([c for c in crops if isinstance(c, torch.Tensor)]), streams.mark()

    with ThreadPoolExecutor(1, thread_name_prefix="device-decode") as pool:
        run.submit(*decoded()).result()  # warm-up: the decoder's handles and buffers, the model
        n, t0 = 0, time.perf_counter()
        ahead, behind = pool.submit(decoded), None
        while time.perf_counter() - t0 < seconds or n == 0:
            x, ready = ahead.result()
            ahead = pool.submit(decoded)
            pending = run.submit(x, ready)
            if behind is not None:
                behind.result()
            behind, n = pending, n + len(x)
        behind.result()
        ahead.result()
        return n / (time.perf_counter() - t0)


def choose_decoder(choice: str, bb: Backbone, ex: Extractor, workers: int,
                   cache_dir: str | Path | None = None) -> str:
    """The decoder ``--decode CHOICE`` means for ``ex`` here: the one named, or for ``auto`` the default on a CPU
    device and the fastest measured on a GPU (:func:`measure_decoders`, once per machine, model and workers)."""
    if choice != DECODE_AUTO:
        if not get_decoder(choice).in_workers and ex.device.type == "cpu" and choice not in _warned:
            _warned.add(choice)  # once per process, not once per shard of the devices engine's workers
            log.warning("--decode %s on a CPU device: the batched decoder runs on CPU tensors in the main process, "
                        "one batch at a time (what tests of it on a machine without a GPU run); the default decodes "
                        "faster there", choice)
        return choice
    if ex.device.type != "cuda":
        return DEFAULT_DECODER
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    pre = bb.preprocess
    key = (f"{cache_key(bb, ex.precision, ex.device, True)}|{ex.compile}|batch {ex.batch_size}|{workers} workers|"
           f"{measured.machine(ex.device)}")

    def measure() -> str:
        rates = measure_decoders(ex, pre, workers, probe_jpegs())
        log.info("decoders with this model here: %s", ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
        return max((n for n in rates if n in decoder_names()), key=rates.get)

    return measured.remembered(cache / "decode.json", key, measure, lambda v: v in decoder_names(),
                               "the fastest decoder")
