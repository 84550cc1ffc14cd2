"""`embedpipe bench`: throughput ratios measured side by side on this machine."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import config_option
from ..model.device import COMPILE_MODES, CPU_PRECISIONS
from ..model.specs import DEFAULT_MODEL
from .group import cli
from .logs import quiet_option


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--weights", default="default", show_default=True)
@click.option("--precision", type=click.Choice(["auto", *CPU_PRECISIONS]), default="auto", show_default=True, help="Mode used for T (auto: the fastest measured).")
@click.option("--compile", "compile_mode", type=click.Choice(["auto", *COMPILE_MODES]), default="auto", show_default=True, help="Mode used for T (auto: the fastest measured).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--micro-batch", type=int, default=None, help="Images per model call (default as in embed: measured on CPU; 0 = whole batch).")
@click.option("--workers", type=int, default=None, help="Decode workers for T (default as in embed).")
@click.option("--quick", is_flag=True, help="Fewer images and shorter timings (under 2 minutes on 2 cores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Keep shards and outputs here.")
@quiet_option()
@config_option
def bench(model: str, weights: str, precision: str, compile_mode: str, batch_size: int, micro_batch: int | None, workers: int | None,
          quick: bool, json_path: str | None, workdir: str | None) -> None:
    """Measure decode, model, write and end-to-end rates, the bound and efficiency, and the tutorial baseline."""
    from ..bench import format_report, run_bench

    report = run_bench(model, weights, quick, workdir, precision, compile_mode, batch_size, workers, micro_batch)
    click.echo(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
