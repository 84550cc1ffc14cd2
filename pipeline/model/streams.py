"""Batches through the extractor without waiting for each one: on CUDA the host-to-device copy of a batch and the
device-to-host copy of its embeddings run on side streams while the model runs on the main one, and a batch's
embeddings are read only when the caller asks for them (a batch later), so the loop never synchronises per batch.

On a CPU device the same calls run with streams and events that do nothing, so the order of work and the
embeddings are the ones a CUDA run gives, and CPU tests run this code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .compile import Extractor


class _NoEvent:
    def synchronize(self) -> None:
        pass


class Streams:
    """The side streams of one device (copies in, copies out, device decoding), or none on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.copy_in = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)
            self.decode = torch.cuda.Stream(device)
        else:
            self.copy_in = self.copy_out = self.decode = None

    def on(self, stream: Any) -> contextlib.AbstractContextManager:
        """Work queued inside runs on ``stream`` (nothing changes on a CPU)."""
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def mark(self) -> Any:
        """An event at the current point of this device's current stream (named: the process's current device
        may be another one)."""
        if not self.cuda:
            return _NoEvent()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        """The current stream waits (on the device, not the host) until ``event``."""
        if self.cuda and event is not None and not isinstance(event, _NoEvent):
            torch.cuda.current_stream(self.device).wait_event(event)

    def used_here(self, tensor: torch.Tensor) -> None:
        """``tensor``, made on another stream, is used on the current one: its memory is not reused before that."""
        if self.cuda and tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(self.device))


@dataclass
class Pending:
    """A batch's embeddings on their way to the host; :meth:`result` waits for them."""

    host: torch.Tensor
    copied: Any
    dtype: str
    inputs: Any  # the batch, kept alive until the copies that read it are done

    def result(self) -> np.ndarray:
        """The embeddings as a ``dtype`` array (waits for this batch's copy to the host, nothing else)."""
        self.copied.synchronize()
        self.inputs = None
        return self.host.numpy().astype(self.dtype, copy=False)


class StreamedEmbedder:
    """Embeddings as the embed stage stores them (L2-normalised when asked, ``dtype``), computed without a wait.

    Example:
        >>> run = StreamedEmbedder(ex, normalize=True, dtype="float16")  # doctest: +SKIP
        >>> pending = run.submit(batch_uint8)  # returns at once on CUDA
        >>> pending.result().shape  # waits for that batch only
        (64, 1280)
    """

    def __init__(self, ex: Extractor, normalize: bool, dtype: str):
        self.ex, self.normalize, self.dtype = ex, normalize, dtype
        self.streams = Streams(ex.device)

    @torch.inference_mode()
    def submit(self, images: torch.Tensor, ready: Any = None) -> Pending:
        """Queue one uint8 batch (pinned host memory, or already on the device after ``ready``, an event of the
        stream that made it). Its host-to-device copy waits for nothing the model does."""
        s = self.streams
        with s.on(s.copy_in):
            s.wait(ready)
            x = images.to(self.ex.device, non_blocking=True)
            arrived = s.mark()
        s.wait(arrived)
        s.used_here(x)
        feats = self.ex(x)
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        computed = s.mark()
        with s.on(s.copy_out):
            s.wait(computed)
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=s.cuda)
            host.copy_(feats, non_blocking=True)
            s.used_here(feats)
            copied = s.mark()
        return Pending(host, copied, self.dtype, images)

