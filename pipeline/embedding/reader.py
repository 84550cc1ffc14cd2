"""Tar shards -> header-checked samples, decoded (resized, centre-cropped uint8 ``Piece``) in the DataLoader workers
or, for a decoder that runs in the main process, handed over encoded; whole shards per worker."""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..captions import bounded_field
from ..model.decoders import DEFAULT_DECODER, get_decoder
from ..model.image_header import DEFAULT_MAX_PIXELS, Header, SkipSample, read_header
from ..model.preprocess import Preprocess
from . import tar
from .tar import DEFAULT_MAX_MEMBER_MB, DEFAULT_MAX_SHARD_GB, IMAGE_EXTS, KEEPABLE, LABEL
from .worker_shards import owns, shard_owners

log = logging.getLogger(__name__)

# Errors that mean a bug in our code, never bad data: they must crash, not be recorded as a skipped sample.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the label column is int64
CPU = torch.device("cpu")


@dataclass
class Piece:
    """What a worker sends: a batch of one shard's samples, and at the shard's end, the worker's tally.

    With a decoder that runs in the main process, the rows come with their images still encoded (``encoded``,
    ``headers``) and ``images`` empty, until :meth:`ShardSamples.decode_encoded` decodes them there.
    """

    url: str
    images: torch.Tensor  # uint8 [B, 3, S, S]
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    extra: dict[str, list[str | None]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # embedded, but a field was stored differently
    encoded: list[bytes] = field(default_factory=list)  # one per row, when the main process decodes
    headers: list[Header] = field(default_factory=list)
    seen: int = 0
    end: bool = False
    failed: str | None = None

    def pin_memory(self, device: Any = None) -> "Piece":
        """Called by the DataLoader's pin thread (``pin_memory=True``, on CUDA): the images in page-locked memory,
        so that their copy to the device runs on a side stream while the model works (``model/streams.py``)."""
        if len(self.images):
            self.images = self.images.pin_memory()
        return self


def _label(sample: dict[str, Any]) -> tuple[int | None, str | None]:
    """The sample's ``cls`` as an int64 label, or None and why it is left empty."""
    raw = sample.get(LABEL)
    if raw is None:
        return None, None
    try:
        value = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        why = f"cls {raw[:20]!r} is not an integer; label stored as null"
    else:
        if INT64_MIN <= value <= INT64_MAX:
            return value, None
        why = f"cls {str(value)[:30]} does not fit a 64-bit label; label stored as null"
    log.warning("%s: key %s: %s", sample["__url__"], sample["__key__"], why)
    return None, why


class ShardSamples(IterableDataset):
    """Iterates shards in order; each DataLoader worker reads only the shards it owns (``shard_owners``), whole,
    and its share of the samples of a split tail shard (every ``num_workers``-th one), when fewer shards are left
    than workers.

    A worker checks the header of every image it reads; with a decoder that runs in workers (``cpu``) it decodes
    there too, else it hands the encoded bytes over for :meth:`decode_encoded` in the main process.
    Each worker ends each shard with a ``Piece(end=True)`` carrying its counts and skipped keys, or
    ``failed=reason`` when the shard itself cannot be read; for a shard it does not own it sends only that end
    (``seen=0``), without opening the shard, so the main process knows when every worker is done with a shard.
    """

    def __init__(self, urls: Sequence[str], pre: Preprocess, batch_size: int, keep: Sequence[str] = KEEPABLE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode_threads: int = 1, decoder: str = DEFAULT_DECODER,
                 max_member_mb: float = DEFAULT_MAX_MEMBER_MB, max_shard_gb: float = DEFAULT_MAX_SHARD_GB):
        self.urls = list(urls)
        self.decode_threads = decode_threads
        self.decoder = get_decoder(decoder)
        self.pre = pre
        self.batch_size = batch_size
        self.keep = [k for k in keep if k in KEEPABLE]
        self.fields = (*IMAGE_EXTS, LABEL, *self.keep)  # the only members whose data is read
        self.max_pixels = max_pixels
        self.max_member_mb, self.max_shard_gb = max_member_mb, max_shard_gb
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            # PIL refuses images above twice its own limit on open: an explicit larger --max-pixels wins.
            Image.MAX_IMAGE_PIXELS = max_pixels

    def __iter__(self) -> Iterator[Piece]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for url, owner in zip(self.urls, shard_owners(self.urls, nw)):
            if owner is None:  # a split tail shard: worker 0 records the members that are no sample
                yield from self._shard(url, owns(wid, nw), records=wid == 0)
            elif owner == wid:
                yield from self._shard(url, None, records=True)
            else:
                yield Piece(url, self._empty(url).images, end=True)

    def _empty(self, url: str) -> Piece:
        s = self.pre.input_size
        return Piece(url, torch.empty(0, 3, s, s, dtype=torch.uint8), extra={k: [] for k in self.keep})

    def _decode(self, data: list[bytes], headers: list[Header],
                device: torch.device) -> list[torch.Tensor | SkipSample]:
        """The decoder's results, one per image; a failure on the batch is retried image by image, so it costs
        only the images that fail."""
        try:
            out = self.decoder.decode(data, headers, self.pre, device)
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001  a decoder's own failure on one input (RuntimeError, MemoryError...)
            # is a problem of that sample: it is recorded with its reason, and the shard and the run go on.
            if len(data) > 1:
                return [self._decode([d], [h], device)[0] for d, h in zip(data, headers)]
            return [e if isinstance(e, SkipSample) else SkipSample(f"cannot decode: {type(e).__name__}: {e}")]
        if len(out) != len(data):
            raise AssertionError(f"decoder {self.decoder.name!r} returned {len(out)} results for {len(data)} images; "
                                 "a decoder returns one result per image, in order")
        return out

    def _prepare_one(self, data: bytes) -> torch.Tensor | Header | SkipSample:
        """One image's bytes -> its crop (a decoder that runs here), its header (one that runs in the main
        process), or why it is skipped."""
        try:
            header = read_header(data, self.pre.resize_size, self.max_pixels)
        except SkipSample as e:
            return e
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001  (as in _decode: PIL's own failure to parse this one header)
            return SkipSample(f"cannot decode: {type(e).__name__}: {e}")
        return self._decode([data], [header], CPU)[0] if self.decoder.in_workers else header

    def _decode_batch(self, url: str, raw: list[tuple[int, dict[str, Any], str, Future | None]],
                      piece: Piece) -> Piece:
        """Fill ``piece`` with a batch of samples, in order: each is its index, the sample, its image field's name
        and its job already submitted to the thread pool (in-process decoding), or None to prepare it here."""
        images = []
        for i, sample, ext, job in raw:
            got = job.result() if job is not None else self._prepare_one(sample[ext])
            if isinstance(got, SkipSample):
                piece.skipped.append((sample["__key__"], str(got)))
                continue
            if isinstance(got, Header):
                piece.encoded.append(sample[ext])
                piece.headers.append(got)
            else:
                images.append(got)
            key = sample["__key__"]
            piece.keys.append(key)
            piece.indices.append(i)
            label, why = _label(sample)
            piece.labels.append(label)
            if why:
                piece.warnings.append((key, why))
            if tar.RAW_KEY in sample:
                piece.warnings.append((key, f"key is not valid UTF-8 ({sample[tar.RAW_KEY]!r}); stored escaped"))
            for k in self.keep:
                v = sample.get(k)
                text, why = bounded_field(k, v.decode("utf-8", "replace")) if v is not None else (None, None)
                piece.extra[k].append(text)
                if why:
                    piece.warnings.append((key, why))
        if images:
            piece.images = torch.stack(images)
        return piece

    def decode_encoded(self, piece: Piece, device: torch.device) -> Piece:
        """Decode a piece's encoded images in this process, in one call on ``device`` (a decoder that does not run
        in workers); a row whose image cannot be decoded moves to the skipped keys."""
        results = self._decode(piece.encoded, piece.headers, device)
        ok = [j for j, r in enumerate(results) if not isinstance(r, SkipSample)]
        bad = {piece.keys[j]: str(r) for j, r in enumerate(results) if isinstance(r, SkipSample)}
        if bad:
            piece.skipped.extend(bad.items())
            piece.warnings = [(k, w) for k, w in piece.warnings if k not in bad]  # as for one skipped in a worker
            piece.keys = [piece.keys[j] for j in ok]
            piece.indices = [piece.indices[j] for j in ok]
            piece.labels = [piece.labels[j] for j in ok]
            piece.extra = {k: [v[j] for j in ok] for k, v in piece.extra.items()}
        if ok:
            piece.images = torch.stack([results[j] for j in ok])
        piece.encoded, piece.headers = [], []
        return piece

    def _pool(self) -> ThreadPoolExecutor | None:
        # In the main process (no DataLoader workers) a batch is decoded by one thread per core while the
        # model waits, so decoding uses every core as the bound T* = 1/(1/(C r_d) + 1/r_m + 1/r_w) assumes.
        if self.decode_threads <= 1 or get_worker_info() is not None:
            return None
        if getattr(self, "_executor", None) is None:
            self._executor = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return self._executor

    def _shard(self, url: str, mine: Callable[[int], bool] | None, records: bool) -> Iterator[Piece]:
        """The pieces of one shard: every sample, or only those ``mine`` says this worker owns (the data of the
        others is never read); ``records``: this worker records the members that are no sample field."""
        piece, raw, seen, keys_seen = self._empty(url), [], 0, set()
        pool = self._pool()
        i = -1  # the sample's index in the shard (records of members that are no field take none)
        try:
            for sample in tar.iter_tar_samples(url, self.fields, self.max_member_mb, self.max_shard_gb, wanted=mine):
                key = sample["__key__"]
                if tar.NOT_A_SAMPLE in sample:
                    if records:  # one worker records it
                        seen += 1
                        piece.skipped.append((key, sample[tar.NOT_A_SAMPLE]))
                    continue
                i += 1
                duplicate = key in keys_seen
                keys_seen.add(key)
                if mine is not None and not mine(i):
                    continue
                seen += 1
                if duplicate:
                    piece.skipped.append((key, "duplicate key in shard (first occurrence kept)"))
                    continue
                if tar.REFUSED in sample:
                    piece.skipped.append((key, sample[tar.REFUSED]))
                    continue
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    fields = [k for k in sample if not k.startswith("__")] + sample.get(tar.UNREAD, [])
                    have = ", ".join(sorted(fields)) or "nothing"
                    piece.skipped.append((key, f"no image field (has: {have}; expected one of {', '.join(IMAGE_EXTS)})"))
                    continue
                # Submitted as soon as read, so the pool decodes while this thread reads on through the tar.
                raw.append((i, sample, ext, pool.submit(self._prepare_one, sample[ext]) if pool else None))
                if len(raw) == self.batch_size:
                    yield self._decode_batch(url, raw, piece)
                    piece, raw = self._empty(url), []
            piece = self._decode_batch(url, raw, piece)
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # unreadable, truncated or missing shard: the shard fails, the run goes on
            yield Piece(url, self._empty(url).images, end=True, failed=f"{type(e).__name__}: {e}", seen=seen)
            return
        piece.seen, piece.end = seen, True
        yield piece
