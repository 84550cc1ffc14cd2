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
    from ..verify import incomplete, run_verify

    report, bad = {}, 0
    for path in paths:
        found, info = run_verify(path)
        report[path] = {"problems": found, **info, "incomplete": incomplete(info)}
        bad += bool(found or report[path]["incomplete"])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for path, r in report.items():
            verdict = f"{len(r['problems'])} problem(s)" if r["problems"] else "sound but incomplete" if r["incomplete"] else "OK"
            click.echo(f"{path}: {verdict}")
            for line in r["problems"] + ([r["incomplete"]] if r["incomplete"] else []):
                click.echo(f"  {line}")
            for url, reason in r.get("failed", {}).items():
                click.echo(f"  failed {url}: {reason}")
            for line in r.get("findings", []):
                click.echo(f"  note: {line}")
            for name in r.get("pending_without_record", []):
                click.echo(f"  note: {name}.parquet has no done record (a shard being embedded, or killed before its "
                           "record: left out of indexes; rerun embed to finish it)")
    if bad:
        click.get_current_context().exit(1)
