"""EXIF orientation without PIL: read from a JPEG's marker segments, applied to a decoded ``[C, H, W]`` tensor on
any device. For decoders that take raw bytes (nvJPEG applies no orientation): PIL would parse each image again in
the main process, where this reads a few header bytes."""
from __future__ import annotations

import torch

ORIENTATION_TAG = 0x0112
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of JPEG ``data``, 1 when it has none or it is unreadable; only the segments
    before the first scan are read, as PIL's ``getexif`` reads the first Exif APP1 segment's IFD0."""
    if data[:2] != b"\xff\xd8":
        return 1
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (_SOS, _EOI):
            return 1
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == _APP1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10:i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)  # type: ignore[arg-type]
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):  # type: ignore[arg-type]
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[entry:entry + 2], order) == ORIENTATION_TAG:  # type: ignore[arg-type]
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)  # type: ignore[arg-type]  (a SHORT)
            return value if 1 <= value <= 8 else 1
    return 1


def oriented(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``img`` (``[C, H, W]``) turned upright as PIL's ``ImageOps.exif_transpose`` turns it, for each EXIF value."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:  # PIL's TRANSPOSE
        return img.transpose(-2, -1)
    if orientation == 6:  # PIL's ROTATE_270: a quarter turn clockwise
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:  # PIL's TRANSVERSE
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # PIL's ROTATE_90: a quarter turn anticlockwise
        return torch.rot90(img, 1, (-2, -1))
    return img
