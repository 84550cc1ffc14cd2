"""The tiny model of every test that embeds: resnet18 with seeded random weights at 64 px, eager, no decode workers.

One place for it, in both spellings: :func:`options` for the Python API (``embed(shards, out, **tiny.options())``)
and :func:`cli_args` for ``embedpipe embed`` (``embedpipe("embed", shard, "--out", out, *tiny.cli_args())``).
Tests that need another setting say so with a keyword (``compile="torchscript"``, ``batch_size=8``); ``None``
drops an option, so the command's own default applies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL = "torchvision:resnet18"
BASE: dict[str, Any] = {"model": MODEL, "weights": "none", "input_size": 64, "compile": "eager", "workers": 0,
                        "quiet": True}


def options(**changes: Any) -> dict[str, Any]:
    """The tiny model's embed options, with ``changes`` applied (a value of None removes that option)."""
    merged = {**BASE, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def cli_args(**changes: Any) -> list[str]:
    """The same options as ``embedpipe embed`` flags (``quiet`` is ``-q``)."""
    args: list[str] = []
    for name, value in options(**changes).items():
        if name == "quiet":
            args += ["-q"] if value else []
        elif isinstance(value, bool):
            args.append(f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}")
        else:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def save_fp32_cast_tower(path: Path | str, how: str = "trace", size: int = 64, lerp: bool = False) -> Path:
    """A small ViT-like feature tower saved as a TorchScript file, with the dtype steps of open_clip's visual tower:
    a positional embedding cast to the input's dtype (``pos.to(x.dtype)``) and a LayerNorm that casts its output
    back to its input's dtype. Traced in fp32 (``how="trace"``, as exported open_clip towers are) those casts are
    baked in as float32 steps, so the file cast whole to bf16 fails (a float32 activation meets bf16 LayerNorm
    weights: "mixed dtype (CPU)"); scripted (``how="script"``) they follow the input and bf16 runs.
    ``lerp`` adds a step that fails under autocast too (``torch.lerp`` of a float32 tensor and a matmul's
    output, whose dtypes must match): a file that no reduced precision can run."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pipeline.model.deprecations import torchscript_calls

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            orig_type = x.dtype
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.to(orig_type)

    class Tower(nn.Module):
        def __init__(self, lerp: bool):
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 8, 8)
            self.pos = nn.Parameter(torch.randn(32) * 0.02)
            self.ln = LayerNorm(32)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.proj = nn.Linear(32, 24)
            self.lerp = lerp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = self.ln(x + self.pos.to(x.dtype))
            x = x + self.mlp(x)
            y = self.proj(x.mean(1))
            if self.lerp:
                y = torch.lerp(x.mean(1)[:, :24].float(), y, 0.5)
            return y

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = Tower(lerp).eval()
    path = Path(path)
    with torch.no_grad(), torchscript_calls():
        module = torch.jit.trace(tower, torch.zeros(1, 3, size, size)) if how == "trace" else torch.jit.script(tower)
        torch.jit.save(module, str(path))
    return path
