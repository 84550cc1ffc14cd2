"""Deprecation warnings about torch's own APIs that we still use on purpose, silenced exactly and only around our calls.

TorchScript is deprecated in torch 2.14, but it is the compile mode we ship (and measure against inductor);
its users can do nothing about the warnings. Everything else, including other FutureWarnings, still shows.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

TORCHSCRIPT = r"`torch\.jit\.\w+` is deprecated"
# torchvision 0.29 warns on every decode_image call; decoding runs in threads, where catch_warnings (a global
# swap) is not safe, so this one message gets a standing filter when our decoder is imported.
TORCHVISION_DECODE = "The image decoding and encoding capabilities of TorchVision are deprecated"


@contextlib.contextmanager
def torchscript_calls() -> Iterator[None]:
    """Around our own ``torch.jit`` calls (trace, script, freeze, optimize, save, load)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCHSCRIPT, category=FutureWarning)
        yield


def ignore_torchvision_decode_deprecation() -> None:
    warnings.filterwarnings("ignore", message=TORCHVISION_DECODE, category=DeprecationWarning)


CUDA_HOME_NOTICE = "No CUDA runtime is found, using CUDA_HOME"


class _NoCudaHomeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CUDA_HOME_NOTICE)


def quiet_cuda_home_notice() -> None:
    """Before importing inductor: torch's C++ extension module says, on import, that a CUDA toolkit it found has no
    GPU to run on, on every CPU run of ``--compile inductor``/``aot``. That one line is dropped; the logger's
    other messages still show."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHomeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaHomeNotice())
