"""The `embedpipe` command group: parse options, call one run_* function, map errors to exit codes."""
from __future__ import annotations

import logging
import sys

import click

from . import __version__
from .config import group_defaults, load_toml
from .errors import UserError

log = logging.getLogger("pipeline")


class Group(click.Group):
    """Lists commands in the order they were added (the pipeline's order), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110, "terminal_width": 110})
@click.version_option(__version__, "--version", package_name="embedpipe", prog_name="embedpipe")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Job config (TOML), one [table] per command; CLI flags win.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, verbose: int) -> None:
    """embedpipe: sharded images -> frozen backbone -> Parquet embeddings -> FAISS -> linear probes."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if config_file:
        ctx.default_map = group_defaults(cli, load_toml(config_file), config_file)


def main() -> None:
    """Console entry point: user errors print one clear line and exit 2; failed shards exit 1."""
    try:
        rv = cli.main(standalone_mode=False)
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


# Each stage's commands live in their own cli_<stage>.py and register on `cli` when imported;
# `embedpipe --help` lists them in this order.
from . import cli_sample_data  # noqa: E402,F401
from . import cli_models  # noqa: E402,F401
from . import cli_embed  # noqa: E402,F401
from . import cli_index  # noqa: E402,F401
from . import cli_probe  # noqa: E402,F401
from . import cli_verify  # noqa: E402,F401
from . import cli_bench  # noqa: E402,F401
from . import cli_demo  # noqa: E402,F401
