"""Encoded image bytes -> their header, checked before any pixel is decoded: empty, unknown, bombs, truncated JPEGs.

The checks run in the DataLoader workers for every decoder (``model/decoders/``), so a decoder only ever sees
images whose header passed; this module is also the one home of :class:`SkipSample` and ``DEFAULT_MAX_PIXELS``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; above this a header is treated as a decompression bomb


class SkipSample(Exception):
    """This one sample cannot be embedded; the reason is recorded with its key."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, once it passed the checks: PIL's format name, size and mode."""

    format: str  # "JPEG", "PNG", "WEBP", ...
    width: int
    height: int
    mode: str  # "RGB", "L", "P", "CMYK", "I;16", ...
    # The image as the check opened it (pixels not yet read), so a decoder in the same process reuses that parse
    # instead of opening the bytes again. Never pickled: a header sent to another process arrives without it.
    opened: Any = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return Header, (self.format, self.width, self.height, self.mode)


def _jpeg_truncated(data: bytes) -> bool:
    # The end-of-image marker must follow the last start-of-scan; byte stuffing keeps both out of scan data.
    # Searching forward from the last end-of-image marker (at the very end of an intact file) reads a few
    # bytes, where a backward search for the last start-of-scan read the whole file with the GIL held.
    eoi = data.rfind(b"\xff\xd9")
    return data.find(b"\xff\xda", max(eoi, 0)) != -1


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


def read_header(data: bytes, target_short: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The header of encoded image bytes, or :class:`SkipSample` (raised) saying why the image is refused.

    Only the header is parsed: the pixel count (decoded size) and the size after resizing the shorter side to
    ``target_short`` are both held to ``max_pixels`` before any pixel is allocated, and a JPEG must end after
    its last scan.

    Example:
        >>> read_header(open("cat.jpg", "rb").read(), 256)  # doctest: +SKIP
        Header(format='JPEG', width=640, height=480, mode='RGB')
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
    if im.format == "JPEG" and _jpeg_truncated(data):
        raise SkipSample("truncated JPEG (no end-of-image marker after the last scan)")
    return Header(im.format, w, h, im.mode, opened=im)
