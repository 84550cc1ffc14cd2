"""Encoded image bytes -> uint8 RGB tensors: header checks against decompression bombs, libjpeg-turbo or PIL."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .deprecations import ignore_torchvision_decode_deprecation

if TYPE_CHECKING:  # torch is imported on first decode: option defaults here must not pull it into the CLI
    import torch

ignore_torchvision_decode_deprecation()
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; above this a header is treated as a decompression bomb


class SkipSample(Exception):
    """This one sample cannot be embedded; the reason is recorded with its key."""


def _jpeg_truncated(data: bytes) -> bool:
    # The end-of-image marker must follow the last start-of-scan; byte stuffing keeps both out of scan data.
    # Searching forward from the last end-of-image marker (at the very end of an intact file) reads a few
    # bytes, where a backward search for the last start-of-scan read the whole file with the GIL held.
    eoi = data.rfind(b"\xff\xd9")
    return data.find(b"\xff\xda", max(eoi, 0)) != -1


def _pil_rgb(im: Image.Image) -> "torch.Tensor":
    import torch

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels on white, not black
    arr = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    return arr.permute(2, 0, 1).contiguous()


def _check_resize(w: int, h: int, target_short: int, max_pixels: int) -> None:
    """Refuse an image whose resize (shorter side to ``target_short``) would allocate more than ``max_pixels``.

    The pixel count alone does not bound memory: a 1000000x1 PNG holds 10^6 pixels, but scaling its shorter
    side up to 256 px asks for 256 million x 256 (tens of GB).
    """
    short = min(w, h)
    rw, rh = -(-w * target_short // short), -(-h * target_short // short)  # ceil, as the resize rounds
    if rw * rh > max_pixels:
        raise SkipSample(f"image is {w}x{h}: resizing its shorter side to {target_short} px would make it {rw}x{rh} "
                         f"pixels, above the limit of {max_pixels} (--max-pixels); its aspect ratio is too extreme")


def decode_rgb(data: bytes, target_short: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> "torch.Tensor":
    """Encoded image bytes -> uint8 ``[3, H, W]`` RGB with EXIF orientation applied.

    libjpeg-turbo through torchvision for plain JPEGs (and libwebp for WebP); PIL for every PNG, for alpha,
    palettes, 16-bit and formats torchvision cannot read, and for DCT-scaled decoding of JPEGs much larger than
    the target. libpng is never used: a PNG whose scanline filter byte is invalid makes it crash the process
    (segfault, "bad adaptive filter value"), where PIL's decoder raises an error (and costs about 10% more).
    The header is checked against ``max_pixels`` (decoded size and resized size) before any pixel is allocated.
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
    _check_resize(w, h, target_short, max_pixels)
    fmt = im.format
    if fmt == "JPEG" and _jpeg_truncated(data):
        raise SkipSample("truncated JPEG (no end-of-image marker after the last scan)")
    try:
        if fmt == "JPEG" and im.mode in ("RGB", "L") and min(w, h) >= 2 * target_short:
            im.draft("RGB", (max(1, w * target_short // min(w, h)), max(1, h * target_short // min(w, h))))
            return _pil_rgb(im)
        simple = (fmt == "JPEG" and im.mode in ("RGB", "L", "CMYK")) or (fmt == "WEBP" and im.mode in ("RGB", "L"))
        if simple:
            import torch
            from torchvision.io import ImageReadMode, decode_image

            try:
                img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
                if img.dtype == torch.uint8:  # never another depth: batches are stacked as uint8
                    return img
            except RuntimeError:
                pass  # a variant libjpeg refuses; PIL below decides
        im = Image.open(io.BytesIO(data))
        im.load()
        return _pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipSample(f"cannot decode {fmt or 'image'}: {e}") from None
