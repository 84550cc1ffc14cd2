"""The decoder registry: each module of this package is one decoder (``cpu.py`` -> ``"cpu"``), found by its name.

A decoder turns a batch of encoded images whose headers already passed the checks (``model/image_header.py``,
run in the DataLoader workers for every decoder) into one uint8 ``[3, S, S]`` crop per image, or the reason
that image is skipped. It says where it runs: in the workers (``in_workers``, as ``cpu`` does), or in the main
process, once per batch on the model's device (a GPU decoder: CUDA cannot be initialised in forked workers,
so the workers hand it encoded bytes). Adding one is one module defining ``DECODER``, plus its tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from ...registry import Registry

if TYPE_CHECKING:  # torch is imported with a decoder, not with the registry (option validation, the CLI)
    import torch

    from ..image_header import Header, SkipSample
    from ..preprocess import Preprocess

DEFAULT_DECODER = "cpu"


class Decoder(Protocol):
    """What every decoder is: a name, where it runs, and one batch call."""

    name: str
    in_workers: bool  # decodes in the DataLoader workers (never CUDA there), else in the main process per batch

    def decode(self, data: Sequence[bytes], headers: Sequence["Header"], pre: "Preprocess",
               device: "torch.device") -> list["torch.Tensor | SkipSample"]:
        """One result per image, in order: its uint8 ``[3, pre.input_size, pre.input_size]`` crop (resized and
        centre-cropped per ``pre``) on the decoder's device, or a :class:`SkipSample` saying why it is skipped.

        An exception means the decoder failed on the batch: the caller decodes its images one at a time, and an
        image that still raises is skipped with ``cannot decode: <Type>: <message>`` (errors of our own code,
        such as TypeError, stop the run instead).
        """
        ...


DECODERS: Registry[Decoder] = Registry(__name__, "DECODER", "decoder")
decoder_names = DECODERS.names  # every decoder's name (none imported)
register = DECODERS.register  # a decoder kept outside this package (a plugin, a test), by its name

get_decoder = DECODERS.get  # the decoder called NAME (imported on first use); an unknown NAME lists the names
