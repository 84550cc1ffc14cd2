"""Run `embedpipe` with PNGs decoded by libpng (torchvision's ``decode_image``), as embed did before issue 16: a PNG
whose filter byte is invalid then kills the process (SIGSEGV), the native crash the runner must contain.

    python tests/faults/libpng.py embed SHARDS... --out OUT ...

The decoder is replaced when this file is imported, so the processes multiprocessing spawns from it (which import
the main script again) and the DataLoader workers it forks decode the same way. Not collected: no ``test_`` prefix.
"""
import sys

import torch
from torchvision.io import ImageReadMode, decode_image

import pipeline.embedding.reader as reader

_pil_path = reader.decode_rgb


def libpng_first(data: bytes, target_short: int, max_pixels: int) -> torch.Tensor:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return _pil_path(data, target_short, max_pixels)


reader.decode_rgb = libpng_first

if __name__ == "__main__":
    from pipeline.cli import main

    sys.argv = ["embedpipe", *sys.argv[1:]]
    main()
