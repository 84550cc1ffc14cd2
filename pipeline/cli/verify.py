"""`embedpipe verify`: integrity checks of embed and index folders."""
from __future__ import annotations

import json

import click

from .group import cli


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(paths: tuple[str, ...], as_json: bool) -> None:
    """Check embed folders (rows, keys, dim, dtype, NaN vs done records) and index folders (counts, ids)."""
    from ..verify import run_verify

    report, problems = {}, 0
    for path in paths:
        found, info = run_verify(path)
        report[path] = {"problems": found, **info}
        problems += len(found)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for path, r in report.items():
            click.echo(f"{path}: {'OK' if not r['problems'] else str(len(r['problems'])) + ' problem(s)'}")
            for line in r["problems"]:
                click.echo(f"  {line}")
    if problems:
        click.get_current_context().exit(1)
