"""The ``gpu`` decoder: a batch's JPEGs decoded in one call on the model's device (nvJPEG through torchvision's
``decode_jpeg(list, device=...)``), turned upright, resized and centre-cropped there; every image it cannot decode
goes to the cpu decoder, alone, with the cpu decoder's records.

It runs in the main process (``in_workers = False``): CUDA cannot be initialised in forked DataLoader workers, so
they only parse the tars, check headers and hand the bytes over. On a CPU device the same calls run on CPU
tensors (libjpeg-turbo), so its batching, fallbacks and fidelity are tested without a GPU.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ..deprecations import ignore_torchvision_decode_deprecation
from ..image_header import Header, SkipSample
from ..orientation import jpeg_orientation, oriented
from ..preprocess import Preprocess, resize_crop_batch
from . import cpu

log = logging.getLogger(__name__)
ignore_torchvision_decode_deprecation()
# The encoded bytes are only read: a tensor over them without a copy is safe, and torch's warning about an
# unwritable buffer would come once per run for nothing.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

CPU = torch.device("cpu")
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG turns into RGB; CMYK/YCCK go to the cpu decoder
# Above this many pixels the cpu decoder's DCT-scaled decode (an eighth of the pixels) costs less than a full
# decode on the device, and a batch of such images cannot take the device's memory.
MAX_DEVICE_PIXELS = 36_000_000


def on_device(header: Header) -> bool:
    """Whether an image goes to the batched device call (else straight to the cpu decoder)."""
    return (header.format == "JPEG" and header.mode in DEVICE_MODES
            and header.width * header.height <= MAX_DEVICE_PIXELS)


def decode_jpegs(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 RGB ``[3, H, W]`` on ``device`` (not yet turned upright), or None where the decoder
    refuses it. One call for the batch; a batch it refuses is split in halves until the refused images are alone,
    so k bad images among n cost about 2·k·log2(n) calls, and none costs one."""
    if not data:
        return []
    try:
        out = decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in data], mode=ImageReadMode.RGB,
                          device=device)
    except RuntimeError as e:  # nvJPEG's or libjpeg's refusal of one of the images (progressive, corrupt...)
        if len(data) == 1:
            log.debug("the device decoder refused an image (%s); the cpu decoder decodes it", e)
            return [None]
        half = len(data) // 2
        return decode_jpegs(data[:half], device) + decode_jpegs(data[half:], device)
    return [t if t.dim() == 3 and t.shape[0] == 3 and t.dtype == torch.uint8 else None for t in out]


@dataclass(frozen=True)
class GpuDecoder:
    """Decodes a whole batch in one call on the model's device, in the main process."""

    name: str = "gpu"
    in_workers: bool = False

    def decode(self, data: Sequence[bytes], headers: Sequence[Header], pre: Preprocess,
               device: torch.device) -> list[torch.Tensor | SkipSample]:
        """Each image's uint8 ``[3, S, S]`` crop on ``device``, or why it is skipped (the cpu decoder's reason)."""
        batched = [j for j, h in enumerate(headers) if on_device(h)]
        decoded = decode_jpegs([data[j] for j in batched], device)
        good = [(j, oriented(t, jpeg_orientation(data[j]))) for j, t in zip(batched, decoded) if t is not None]
        out: list[torch.Tensor | SkipSample | None] = [None] * len(data)
        for (j, _), crop in zip(good, resize_crop_batch([t for _, t in good], pre)):
            out[j] = crop
        rest = [j for j, r in enumerate(out) if r is None]
        if rest:
            alone = cpu.DECODER.decode([data[j] for j in rest], [headers[j] for j in rest], pre, CPU)
            for j, r in zip(rest, alone):
                out[j] = r if isinstance(r, SkipSample) else r.to(device, non_blocking=True)
        return out  # type: ignore[return-value]


DECODER = GpuDecoder()
