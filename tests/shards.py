"""Test helpers: write real WebDataset tar shards, and produce genuinely encoded (good and faulty) image bytes."""
from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset import TarWriter

def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8 and arr.dtype != np.uint16:
        raise TypeError(f"expected a uint8 (or uint16) array, got {arr.dtype}")
    return Image.fromarray(arr)


def sample_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """A smooth, non-trivial RGB uint8 picture of ``size`` = (width, height): gradients plus a seeded disc."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.25 * min(w, h) + 1
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    rgb = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), disc], axis=-1) * 255
    return rgb.astype(np.uint8)


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = 90, **save_args: Any) -> bytes:
    """Encode an RGB/L/CMYK array or PIL image as a real JPEG."""
    buf = io.BytesIO()
    _to_pil(image).save(buf, format="JPEG", quality=quality, **save_args)
    return buf.getvalue()


def png_bytes(image: np.ndarray | Image.Image, **save_args: Any) -> bytes:
    """Encode an array or PIL image (any PNG-able mode) as a real PNG."""
    buf = io.BytesIO()
    _to_pil(image).save(buf, format="PNG", **save_args)
    return buf.getvalue()


# ---- fault variants: each is genuine bytes of its kind (checked with PIL in tests/test_sample_data.py) ----

def truncated_jpeg_bytes(size: tuple[int, int] = (64, 48), keep: float = 0.5) -> bytes:
    """A real JPEG cut to ``keep`` of its length: PIL opens the header, ``load()`` raises OSError."""
    data = jpeg_bytes(sample_image(size))
    return data[: max(4, int(len(data) * keep))]


def not_image_bytes() -> bytes:
    """Bytes that are no image format at all: PIL raises UnidentifiedImageError."""
    return b"this is not an image, just some text in a .jpg member\n" * 4


def cmyk_jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A real 4-channel CMYK JPEG (opens as mode CMYK)."""
    return jpeg_bytes(Image.fromarray(sample_image(size)).convert("CMYK"))


def png16_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A real 16-bit grayscale PNG (bit depth 16 in IHDR; opens as mode I;16), values spanning 0..65535."""
    w, h = size
    ramp = np.linspace(0, 65535, w * h, dtype=np.float64).reshape(h, w).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))


def palette_png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A real palette (mode P) PNG whose palette index 0 is transparent (a tRNS chunk)."""
    img = Image.fromarray(sample_image(size)).quantize(colors=16)
    return png_bytes(img, transparency=0)


def grayscale_jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A real single-channel (mode L) JPEG."""
    return jpeg_bytes(Image.fromarray(sample_image(size)).convert("L"))


def one_pixel_jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real 1x1 RGB JPEG."""
    return jpeg_bytes(Image.new("RGB", (1, 1), color))


def exif_rotated_jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A real JPEG stored as ``size`` (w, h) with EXIF Orientation=6: displayed (after exif_transpose) as (h, w)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return jpeg_bytes(sample_image(size), exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png_bytes(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height`` 8-bit RGB (7.5 GB decoded at 50000²).

    Valid signature, IHDR/IDAT/IEND chunks with correct CRCs; the IDAT holds only a few zero rows. PIL's
    ``Image.open`` raises ``Image.DecompressionBombError`` (above 2 x MAX_IMAGE_PIXELS) before decoding.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def raw_png_bytes(width: int, height: int, rows: bytes, bit_depth: int = 8) -> bytes:
    """A PNG of 8- or 16-bit RGB (colour type 2) whose IDAT holds ``rows`` exactly as given (each scanline is a
    filter byte then the pixels), with valid chunk CRCs: for inputs no encoder would write."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))


def bad_filter_png_bytes(size: int = 8, filter_byte: int = 7) -> bytes:
    """An 8-bit RGB PNG whose scanlines use filter type 7 (valid ones are 0-4): libpng aborts with "bad adaptive
    filter value" and, through torchvision's ``decode_image``, the process dies of SIGSEGV."""
    row = bytes([filter_byte]) + bytes(range(3 * size))
    return raw_png_bytes(size, size, row * size)


def png16_rgb_bytes(size: int = 8) -> bytes:
    """A real 16-bit RGB PNG (colour type 2, bit depth 16), encoded by PIL from 48-bit pixels; values span the
    range so the top byte of each channel differs from the bottom one."""
    x = np.arange(size * size * 3, dtype=np.uint32).reshape(size, size, 3) * (65535 // (size * size * 3))
    rows = b"".join(b"\x00" + x[y].astype(">u2").tobytes() for y in range(size))
    return raw_png_bytes(size, size, rows, bit_depth=16)


def wide_png_bytes(width: int = 1_000_000, height: int = 1) -> bytes:
    """A valid 8-bit RGB PNG of ``width`` x ``height`` black pixels: a few KB that decode to only ``width`` pixels,
    but whose shorter side scaled to 256 px would need tens of GB (the resize, not the decode, is the bomb)."""
    return raw_png_bytes(width, height, (b"\x00" + bytes(3 * width)) * height)


def write_raw_tar(path: str | Path, members: Iterable[tuple[bytes, bytes]]) -> Path:
    """A tar whose member names are given as raw bytes (e.g. ``b"bad_\\xff.jpg"``, not UTF-8), GNU format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


# name -> (extension, bytes factory): the fault kinds, for parametrized fault tests.
FAULTS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "truncated": ("jpg", truncated_jpeg_bytes),
    "not_image": ("jpg", not_image_bytes),
    "cmyk": ("jpg", cmyk_jpeg_bytes),
    "png16": ("png", png16_bytes),
    "palette_transparent": ("png", palette_png_bytes),
    "grayscale": ("jpg", grayscale_jpeg_bytes),
    "one_pixel": ("jpg", one_pixel_jpeg_bytes),
    "exif_rotated": ("jpg", exif_rotated_jpeg_bytes),
    "bomb": ("png", bomb_png_bytes),
}
# Faults no decoder can turn into a picture (the rest are odd but valid images a reader should handle).
UNDECODABLE = ("truncated", "not_image", "bomb")


def _member_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value)).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"cannot store {type(value).__name__} in a tar member; give bytes, str, int, dict or list")


def write_tar(path: str | Path, samples: Iterable[dict[str, Any]]) -> Path:
    """Write a real WebDataset tar shard: one member ``KEY.EXT`` per entry of each sample dict.

    Values may be bytes, str (UTF-8), int (ASCII, e.g. ``cls``) or dict/list (JSON). Member mtimes are
    fixed, so the same samples give byte-identical shards.

    Example:
        >>> write_tar(tmp / "s-000000.tar", [{"__key__": "a", "jpg": jpeg_bytes(sample_image()), "cls": 3}])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, TarWriter(f, encoder=False, mtime=0.0) as w:
        for s in samples:
            if "__key__" not in s:
                raise ValueError(f"sample has no __key__: {sorted(s)}")
            w.write({k: (v if k.startswith("_") else _member_bytes(v)) for k, v in s.items()})
    return path


def tiny_shards(root: str | Path, n: int, per: int = 3) -> list[str]:
    """``n`` shards ``root/p-NN.tar`` of ``per`` small real JPEGs each (keys ``s<shard>_<i>``); their paths."""
    return [str(write_tar(Path(root) / f"p-{s:02d}.tar", [{"__key__": f"s{s}_{i}", "jpg": jpeg_bytes(
        sample_image((40, 32), seed=s * 10 + i))} for i in range(per)])) for s in range(n)]


def fault_samples(good_every: int = 1) -> list[dict[str, Any]]:
    """Samples ``good_000``, ``bad_<fault>``, ``good_001``, ... interleaving real good JPEGs with each fault.

    Every sample has ``cls`` (good: its index; faults: 0).
    """
    out: list[dict[str, Any]] = []
    for i, (name, (ext, make)) in enumerate(FAULTS.items()):
        for g in range(good_every):
            n = i * good_every + g
            out.append({"__key__": f"good_{n:03d}", "jpg": jpeg_bytes(sample_image((48, 40), seed=n)), "cls": n % 10})
        out.append({"__key__": f"bad_{name}", ext: make(), "cls": 0})
    out.append({"__key__": f"good_{len(FAULTS) * good_every:03d}", "jpg": jpeg_bytes(sample_image((48, 40))), "cls": 0})
    return out


def read_tar(path: str | Path) -> list[dict[str, Any]]:
    """Samples of one shard in order, grouped as WebDataset does (key = member name up to its first dot).

    Values are raw bytes; ``__key__`` and ``__url__`` are set. Uses tarfile directly, so no open handles leak.
    """
    samples: list[dict[str, Any]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", m.name)
            if not m.isfile() or not match:
                continue
            key, ext = match.groups()
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": str(path)})
            samples[-1][ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return samples
