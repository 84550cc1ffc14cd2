"""The tiny model of every test that embeds: resnet18 with seeded random weights at 64 px, eager, no decode workers.

One place for it, in both spellings: :func:`options` for the Python API (``embed(shards, out, **tiny.options())``)
and :func:`cli_args` for ``embedpipe embed`` (``embedpipe("embed", shard, "--out", out, *tiny.cli_args())``).
Tests that need another setting say so with a keyword (``compile="torchscript"``, ``batch_size=8``); ``None``
drops an option, so the command's own default applies.
"""
from __future__ import annotations

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
