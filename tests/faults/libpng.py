"""Run `embedpipe` with PNGs decoded by libpng (torchvision's ``decode_image``), as embed did before issue 16: a PNG
whose filter byte is invalid then kills the process (SIGSEGV), the native crash the runner must contain.

    python tests/faults/libpng.py embed SHARDS... --out OUT ...

The cpu decoder's per-image decode is replaced when this file is imported, so the processes multiprocessing spawns
from it (which import the main script again) and the DataLoader workers it forks decode the same way. Not collected:
no ``test_`` prefix.
"""
import sys

import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.model.decoders import cpu
from pipeline.model.image_header import Header

_pil_path = cpu.decode_rgb


def libpng_first(data: bytes, header: Header, target_short: int) -> torch.Tensor:
    if header.format == "PNG":
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return _pil_path(data, header, target_short)


cpu.decode_rgb = libpng_first  # the function the cpu decoder calls for each image (after the header checks)

if __name__ == "__main__":
    from pipeline.cli import main

    sys.argv = ["embedpipe", *sys.argv[1:]]
    main()
