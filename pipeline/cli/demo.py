"""`embedpipe demo`: every stage end to end on real sample images, offline."""
from __future__ import annotations

import click

from ..sample_data import DATASETS
from .group import cli
from .logs import quiet_option


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="Where everything is written.")
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True)
@click.option("--model", default="default", show_default=True, help="Backbone (default: embedded pretrained EfficientNet-Lite0).")
@click.option("--limit", type=int, default=None, help="Use only the first N sample images.")
@quiet_option()
def demo(out: str, dataset: str, model: str, limit: int | None) -> None:
    """Run the whole pipeline on real labelled images: shards, embed, index, search, probe, k-NN."""
    from ..demo import run_demo

    run_demo(out, dataset=dataset, echo=click.echo, model=model, limit=limit)
