"""The ``embedpipe`` click group. Command modules import it from here and register on it (``@cli.command()``)."""
from __future__ import annotations

import click

from ..config import group_defaults, load_toml
from ..version import __version__
from . import logs


class Group(click.Group):
    """Lists commands in the order they were added (the pipeline's order), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110, "terminal_width": 110})
@click.version_option(__version__, "--version", package_name="embedpipe", prog_name="embedpipe")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Job config (TOML), one [table] per command; CLI flags win.")
@click.option("-v", "--verbose", count=True, help="More logging (-v our debug lines, -vv every library's).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and summary lines (every command).")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, verbose: int, quiet: bool) -> None:
    """embedpipe: sharded images -> frozen backbone -> Parquet embeddings -> FAISS -> linear probes."""
    logs.configure(verbose, quiet)
    if config_file:
        ctx.default_map = group_defaults(cli, load_toml(config_file), config_file)
