"""TOML job configs merged under CLI flags (through click's default_map), with unknown keys refused."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None


def command_defaults(command: click.Command, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``values`` against a command's options and return them as a click default_map.

    Keys may use dashes or underscores (``batch-size`` or ``batch_size``). Unknown keys are errors
    that list the valid ones, so a typo in a job config never silently does nothing.

    Example:
        ``k = 3`` in ``[search]`` (its option is ``-k``), ``compile = "eager"`` in ``[embed]`` (``--compile``).
    """
    params: dict[str, click.Option] = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name != "config":
            # Keys are the flag names users see (``compile`` for ``--compile``), dashes or underscores; an
            # option with only a short flag is keyed by its letter (``k`` for search's ``-k``).
            longs = [f for f in p.opts if f.startswith("--")]
            for flag in longs or p.opts:
                params[flag.lstrip("-").replace("-", "_")] = p
    out: dict[str, Any] = {}
    for key, value in values.items():
        param = params.get(key.replace("-", "_"))
        if param is None:
            valid = ", ".join(sorted({k.replace("_", "-") for k in params}))
            raise UserError(f"{source}: unknown key {key!r} for `embedpipe {command.name}`; valid keys: {valid}")
        if param.multiple and not isinstance(value, list):
            value = [value]
        out[param.name] = value
    return out


def group_defaults(group: click.Group, data: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """A whole-job config: one TOML table per command, e.g. ``[embed]`` and ``[index]``."""
    out = {}
    for section, values in data.items():
        cmd = group.commands.get(section)
        if cmd is None or not isinstance(values, dict):
            raise UserError(
                f"{source}: unknown section [{section}]; sections name commands: {', '.join(sorted(group.commands))}"
            )
        out[section] = command_defaults(cmd, values, f"{source} [{section}]")
    return out


def apply_command_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager callback for a command's own ``--config FILE``: flat keys, or the table named after the command."""
    if value:
        data = load_toml(value)
        if ctx.command.name in data and isinstance(data[ctx.command.name], dict):
            data = data[ctx.command.name]
        ctx.default_map = {**(ctx.default_map or {}), **command_defaults(ctx.command, data, value)}
    return value


config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=apply_command_config,
    help="TOML file of option values (flags given on the command line win).",
)
