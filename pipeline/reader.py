"""Tar shards -> samples -> decoded, resized, centre-cropped uint8 images, split across DataLoader workers."""
from __future__ import annotations

import collections
import io
import logging
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .backbones import Preprocess

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEEPABLE = ("txt", "json")
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; above this a header is treated as a decompression bomb
# Errors that mean a bug in our code, never bad data: they must crash, not be recorded as a skipped sample.
PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: the key ends at the first dot


class SkipSample(Exception):
    """This one sample cannot be embedded; the reason is recorded with its key."""


class _Tap(io.RawIOBase):
    """The (decompressed) tar byte stream, counting bytes and keeping the last ones read.

    tarfile stops *silently* at a garbled header and does not check gzip CRCs; with the tail kept here
    :func:`_check_tar_end` can tell a proper end-of-archive marker from corruption or truncation.
    """

    KEEP = 1 << 16  # > tarfile's read-ahead (one 10 KiB record past the header it could not parse)

    def __init__(self, raw: Any):
        head = raw.read(6) or b""
        self.raw, self.head = raw, head
        if head[:2] == b"\x1f\x8b":  # decompress here, not in tarfile: GzipFile checks the CRC and the length
            import gzip
            self.src: Any = gzip.GzipFile(fileobj=_Prefixed(head, raw))
        elif head[:3] == b"BZh":
            import bz2
            self.src = bz2.BZ2File(_Prefixed(head, raw))
        elif head[:6] == b"\xfd7zXZ\x00":
            import lzma
            self.src = lzma.LZMAFile(_Prefixed(head, raw))
        else:
            self.src = _Prefixed(head, raw)
        self.pos = 0
        self.chunks: collections.deque[bytes] = collections.deque()  # the last reads, >= KEEP bytes in all
        self.kept = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n) if n is not None and n >= 0 else self.src.read()
        self.pos += len(data)
        # References to the chunks, not a copy: keeping a rolling bytearray cost a 64 KiB move per read.
        self.chunks.append(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0]) >= self.KEEP:
            self.kept -= len(self.chunks.popleft())
        return data

    def block(self, offset: int) -> bytes:
        """The 512 bytes at ``offset`` of the tar stream (fewer at its end), once it is read to the end."""
        while self.read(1 << 16):
            pass  # to the end: decompressors verify their checksums there
        tail = b"".join(self.chunks)
        start = len(tail) - (self.pos - offset)
        if start < 0:
            raise tarfile.ReadError(f"cannot check the tar's end at byte {offset}")
        return tail[start: start + 512]


class _Prefixed(io.RawIOBase):
    """``head`` (already read for sniffing) followed by the rest of ``raw``."""

    def __init__(self, head: bytes, raw: Any):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n is None or n < 0 or n >= len(self.head) else self.head[:n]
            self.head = self.head[len(out):]
            return out
        return self.raw.read(n) if n is not None and n >= 0 else self.raw.read()

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _check_tar_end(tap: _Tap, offset: int, members: int) -> None:
    """Raise unless the tar ended with its end-of-archive marker where tarfile stopped reading headers."""
    if members == 0 and tap.pos == 0:
        raise tarfile.ReadError("empty file")
    block = tap.block(offset)
    if len(block) < 512:
        raise tarfile.ReadError(f"the tar ends at byte {tap.pos} without its end-of-archive marker (truncated?)")
    if any(block):
        raise tarfile.ReadError(f"invalid tar header at byte {offset}: the shard is corrupt from there on")


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Stream a (gzipped) tar from a path or any url webdataset opens, grouping members by key.

    Raises (so the shard fails, never silently shortened) on a truncated or corrupt tar or gzip stream, a
    garbled header mid-archive, and a ``pipe:`` command or download that exits with an error.
    """
    from webdataset import gopen

    stream = gopen(url, "rb")
    try:
        tap = _Tap(stream)
        members = 0
        with tarfile.open(fileobj=tap, mode="r|") as tf:
            current: dict[str, Any] | None = None
            for member in tf:
                members += 1
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                if not m:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                # A member whose key and extension repeat the current sample's starts a new sample (with a
                # duplicate key, skipped downstream with a reason) instead of silently replacing the first.
                if current is None or current["__key__"] != key or ext in current:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
            if current is not None:
                yield current
            _check_tar_end(tap, tf.offset, members)
    finally:
        _close(stream)


def _close(stream: Any) -> None:
    """Close a gopen stream; a ``pipe:`` command (or curl) that failed raises with its exit status."""
    try:
        stream.close()
    except OSError:
        status, args = getattr(stream, "status", None), getattr(stream, "args", None)
        if status is None or not args:
            raise
        cmd = args[0][0] if args[0] else "?"
        cmd = " ".join(cmd) if isinstance(cmd, (list, tuple)) else str(cmd)
        raise OSError(f"the command `{cmd}` exited with status {status}") from None


def _jpeg_truncated(data: bytes) -> bool:
    # The end-of-image marker must follow the last start-of-scan; byte stuffing keeps both out of scan data.
    # Searching forward from the last end-of-image marker (at the very end of an intact file) reads a few
    # bytes, where a backward search for the last start-of-scan read the whole file with the GIL held.
    eoi = data.rfind(b"\xff\xd9")
    return data.find(b"\xff\xda", max(eoi, 0)) != -1


def _pil_rgb(im: Image.Image) -> torch.Tensor:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels on white, not black
    arr = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    return arr.permute(2, 0, 1).contiguous()


def decode_rgb(data: bytes, target_short: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``[3, H, W]`` RGB with EXIF orientation applied.

    libjpeg-turbo / libpng through torchvision for the common cases; PIL for alpha, palettes, 16-bit and
    formats torchvision cannot read, and for DCT-scaled decoding of JPEGs much larger than the target.
    The header is checked against ``max_pixels`` before any pixel is allocated.
    """
    if not data:
        raise SkipSample("empty image (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SkipSample("not a decodable image (unknown format)") from None
    except Image.DecompressionBombError as e:
        raise SkipSample(f"decompression bomb refused: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise SkipSample(f"image claims {w}x{h} pixels, above the limit of {max_pixels} (--max-pixels)")
    if w < 1 or h < 1:
        raise SkipSample(f"image has no pixels ({w}x{h})")
    fmt = im.format
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise SkipSample("truncated JPEG (no end-of-image marker after the last scan)")
    try:
        if fmt == "JPEG" and im.mode in ("RGB", "L") and min(w, h) >= 2 * target_short:
            im.draft("RGB", (max(1, w * target_short // min(w, h)), max(1, h * target_short // min(w, h))))
            return _pil_rgb(im)
        simple = (fmt == "JPEG" and im.mode in ("RGB", "L", "CMYK")) or (
            fmt in ("PNG", "WEBP") and im.mode in ("RGB", "L"))
        if simple:
            try:
                return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                    apply_exif_orientation=True)
            except RuntimeError:
                pass  # a variant libjpeg/libpng refuses; PIL below decides
        im = Image.open(io.BytesIO(data))
        im.load()
        return _pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipSample(f"cannot decode {fmt or 'image'}: {e}") from None


def resize_crop(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize the shorter side to ``resize_size`` (antialiased), then centre-crop to ``input_size``; stays uint8."""
    mode = InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR
    img = TF.resize(img, [pre.resize_size], interpolation=mode, antialias=True)
    return TF.center_crop(img, [pre.input_size, pre.input_size])


@dataclass
class Piece:
    """What a worker sends: a batch of one shard's samples, and at the shard's end, the worker's tally."""

    url: str
    images: torch.Tensor  # uint8 [B, 3, S, S]
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    extra: dict[str, list[str | None]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 0
    end: bool = False
    failed: str | None = None


def _label(sample: dict[str, Any]) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        log.warning("%s: key %s has a non-integer cls %r; label left empty", sample["__url__"], sample["__key__"], raw[:20])
        return None


class ShardSamples(IterableDataset):
    """Iterates shards in order; each DataLoader worker decodes every ``num_workers``-th sample of every shard.

    Splitting samples (not shards) keeps all workers busy when there are fewer shards than workers.
    Each worker ends each shard with a ``Piece(end=True)`` carrying its counts and skipped keys, or
    ``failed=reason`` when the shard itself cannot be read.
    """

    def __init__(self, urls: Sequence[str], pre: Preprocess, batch_size: int, keep: Sequence[str] = KEEPABLE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode_threads: int = 1):
        self.urls = list(urls)
        self.decode_threads = decode_threads
        self.pre = pre
        self.batch_size = batch_size
        self.keep = [k for k in keep if k in KEEPABLE]
        self.max_pixels = max_pixels
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            # PIL refuses images above twice its own limit on open: an explicit larger --max-pixels wins.
            Image.MAX_IMAGE_PIXELS = max_pixels

    def __iter__(self) -> Iterator[Piece]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for url in self.urls:
            yield from self._shard(url, wid, nw)

    def _empty(self, url: str) -> Piece:
        s = self.pre.input_size
        return Piece(url, torch.empty(0, 3, s, s, dtype=torch.uint8), extra={k: [] for k in self.keep})

    def _decode_one(self, data: bytes) -> torch.Tensor | SkipSample:
        try:
            return resize_crop(decode_rgb(data, self.pre.resize_size, self.max_pixels), self.pre)
        except SkipSample as e:
            return e

    def _decode_batch(self, url: str, raw: list[tuple[int, dict[str, Any], Any]], piece: Piece) -> Piece:
        """Fill ``piece`` with a batch of samples, in order: each third item is a decode already submitted to the
        thread pool (in-process decoding), or the image field's name, decoded here."""
        images = []
        for i, sample, job in raw:
            img = job.result() if isinstance(job, Future) else self._decode_one(sample[job])
            if isinstance(img, SkipSample):
                piece.skipped.append((sample["__key__"], str(img)))
                continue
            images.append(img)
            piece.keys.append(sample["__key__"])
            piece.indices.append(i)
            piece.labels.append(_label(sample))
            for k in self.keep:
                v = sample.get(k)
                piece.extra[k].append(v.decode("utf-8", "replace") if v is not None else None)
        if images:
            piece.images = torch.stack(images)
        return piece

    def _pool(self) -> ThreadPoolExecutor | None:
        # In the main process (no DataLoader workers) a batch is decoded by one thread per core while the
        # model waits, so decoding uses every core as the bound T* = 1/(1/(C r_d) + 1/r_m + 1/r_w) assumes.
        if self.decode_threads <= 1 or get_worker_info() is not None:
            return None
        if getattr(self, "_executor", None) is None:
            self._executor = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return self._executor

    def _shard(self, url: str, wid: int, nw: int) -> Iterator[Piece]:
        piece, raw, seen, keys_seen = self._empty(url), [], 0, set()
        pool = self._pool()
        try:
            for i, sample in enumerate(iter_tar_samples(url)):
                key = sample["__key__"]
                duplicate = key in keys_seen
                keys_seen.add(key)
                if i % nw != wid:
                    continue
                seen += 1
                if duplicate:
                    piece.skipped.append((key, "duplicate key in shard (first occurrence kept)"))
                    continue
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    have = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "nothing"
                    piece.skipped.append((key, f"no image field (has: {have}; expected one of {', '.join(IMAGE_EXTS)})"))
                    continue
                # Submitted as soon as read, so the pool decodes while this thread reads on through the tar.
                raw.append((i, sample, pool.submit(self._decode_one, sample[ext]) if pool else ext))
                if len(raw) == self.batch_size:
                    yield self._decode_batch(url, raw, piece)
                    piece, raw = self._empty(url), []
        except PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # unreadable, truncated or missing shard: the shard fails, the run goes on
            yield Piece(url, self._empty(url).images, end=True, failed=f"{type(e).__name__}: {e}", seen=seen)
            return
        piece = self._decode_batch(url, raw, piece)
        piece.seen, piece.end = seen, True
        yield piece
