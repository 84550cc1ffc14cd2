"""The console entry point: registers every command on the group, maps errors to exit codes."""
from __future__ import annotations

import sys

import click

from ..errors import UserError
from .group import cli

# Each stage's commands register on `cli` when imported; `embedpipe --help` lists them in this order.
# isort: off
from . import sample_data, models, embed, index, serve, probe, verify, bench, demo  # noqa: F401,E402
# isort: on


def main(args: list[str] | None = None) -> None:
    """Run ``embedpipe``: user errors print one clear line and exit 2; failed shards exit 1."""
    try:
        rv = cli.main(args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)
