"""The ``cpu`` decoder: libjpeg-turbo (torchvision) or PIL, one image at a time, in the DataLoader workers."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

from ..deprecations import ignore_torchvision_decode_deprecation
from ..image_header import DEFAULT_MAX_PIXELS, Header, SkipSample, read_header
from ..preprocess import Preprocess, resize_crop

ignore_torchvision_decode_deprecation()


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


def _opened(data: bytes, header: Header) -> Image.Image:
    # The header check's own parse when it was made in this process; a header that crossed processes has none.
    return header.opened if header.opened is not None else Image.open(io.BytesIO(data))


def decode_rgb(data: bytes, header: Header, target_short: int) -> torch.Tensor:
    """Encoded image bytes whose ``header`` passed the checks -> uint8 ``[3, H, W]`` RGB, EXIF orientation applied.

    libjpeg-turbo through torchvision for plain JPEGs (and libwebp for WebP); PIL for every PNG, for alpha,
    palettes, 16-bit and formats torchvision cannot read, and for DCT-scaled decoding of JPEGs much larger than
    the target (shorter side at least twice ``target_short``). libpng is never used: a PNG whose scanline filter
    byte is invalid makes it crash the process (segfault, "bad adaptive filter value"), where PIL's decoder raises
    an error (and costs about 10% more). Raises :class:`SkipSample` for an image PIL cannot decode.
    """
    fmt, w, h, mode = header.format, header.width, header.height, header.mode
    try:
        if fmt == "JPEG" and mode in ("RGB", "L") and min(w, h) >= 2 * target_short:
            im = _opened(data, header)
            im.draft("RGB", (max(1, w * target_short // min(w, h)), max(1, h * target_short // min(w, h))))
            return _pil_rgb(im)
        simple = (fmt == "JPEG" and mode in ("RGB", "L", "CMYK")) or (fmt == "WEBP" and mode in ("RGB", "L"))
        if simple:
            try:
                img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                   apply_exif_orientation=True)
                if img.dtype == torch.uint8:  # never another depth: batches are stacked as uint8
                    return img
            except RuntimeError:
                pass  # a variant libjpeg refuses; PIL below decides
        im = _opened(data, header)
        im.load()
        return _pil_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SkipSample(f"cannot decode {fmt or 'image'}: {e}") from None


@dataclass(frozen=True)
class CpuDecoder:
    """Decodes each image on its own, on the CPU; runs in the DataLoader workers (or the decode threads)."""

    name: str = "cpu"
    in_workers: bool = True

    def decode(self, data: Sequence[bytes], headers: Sequence[Header], pre: Preprocess,
               device: torch.device) -> list[torch.Tensor | SkipSample]:
        """Each image resized and centre-cropped per ``pre``, on the CPU whatever ``device`` says (the model
        moves the batch), or why it is skipped."""
        out: list[torch.Tensor | SkipSample] = []
        for d, h in zip(data, headers):
            try:
                out.append(resize_crop(decode_rgb(d, h, pre.resize_size), pre))
            except SkipSample as e:
                out.append(e)
        return out


DECODER = CpuDecoder()


def decode_one(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One encoded image -> its uint8 ``[3, S, S]`` model input (header checked, decoded, resized, cropped), for
    callers with single images (queries of the service, measurements); raises :class:`SkipSample`.

    Example:
        >>> decode_one(open("cat.jpg", "rb").read(), Preprocess()).shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    return resize_crop(decode_rgb(data, read_header(data, pre.resize_size, max_pixels), pre.resize_size), pre)
