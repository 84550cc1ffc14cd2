"""Where and how the model runs: device, precision and compile-mode names, and their resolution on this machine."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from ..threads import model_threads

if TYPE_CHECKING:
    import torch

DEVICE_AUTO = "auto"
PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)  # auto: fp16 on CUDA; the embed stage's is measured on a CPU
CPU_PRECISIONS = ("fp32", "bf16")  # fp16 on a CPU is refused: slow, often unsupported kernels
COMPILE_MODES = ("torchscript", "inductor", "max-autotune", "aot", "eager")
# torch.compile's modes: inductor's default, and its kernel search without CUDA graphs (whose static outputs the
# next call overwrites, while the loop still copies the last batch's embeddings out: model/streams.py)
TORCH_COMPILE_MODES = {"inductor": "default", "max-autotune": "max-autotune-no-cudagraphs"}
FIXED_BATCH_MODES = ("inductor", "max-autotune", "aot")  # compiled for one batch size: shorter batches are padded
DEFAULT_COMPILE = "torchscript"  # where nothing is measured (queries, probes, bench's reference)
COMPILE_AUTO = "auto"  # the embed stage's default: measured among the modes this machine builds (model/tuning.py)
COMPILE_CHOICES = (COMPILE_AUTO, *COMPILE_MODES)


def torch_dtype(precision: str) -> "torch.dtype":
    """The torch dtype of a precision name (``fp32``, ``fp16``, ``bf16``)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def resolve_device(device: str) -> "torch.device":
    """``auto`` = first CUDA device if any, else CPU; a CUDA device that is not there is a clear error."""
    import torch

    if device == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_precision(precision: str, device: "torch.device") -> str:
    """``auto`` = fp16 on CUDA, fp32 on CPU (the embed stage resolves its own ``auto`` on a CPU first, by
    measurement: ``model/auto_precision.py``). fp16 on a CPU is refused (slow, often unsupported kernels)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISION_CHOICES)}")
    if device.type == "cpu" and precision not in CPU_PRECISIONS:
        raise UserError("--precision fp16 is not supported on CPU; use --precision bf16 (or fp32)")
    return precision


def check_compile_mode(compile: str, auto: bool = False) -> None:
    """A compile mode's name (``auto`` too where ``auto`` is true: the embed stage's choice), else a UserError."""
    choices = COMPILE_CHOICES if auto else COMPILE_MODES
    if compile not in choices:
        raise UserError(f"unknown compile mode {compile!r}; use one of {', '.join(choices)}")


_torch_threads: int | None = None  # torch's count before embedpipe first changed it


def set_cpu_threads(workers: int = 0, share: int = 1) -> int:
    """Set torch's intra-op threads for a model on CPU to ``threads.model_threads`` and return the count: never
    more than torch had before embedpipe first set it (its default, ``OMP_NUM_THREADS``, or the caller's)."""
    import torch

    global _torch_threads
    if _torch_threads is None:
        _torch_threads = torch.get_num_threads()
    n = model_threads(workers, share, cap=_torch_threads)
    torch.set_num_threads(n)
    return n
