"""`embedpipe sample-data`: write a small labelled real-image dataset as WebDataset shards."""
from __future__ import annotations

from pathlib import Path

import click

from ..config import config_option
from ..sample_data import DATASETS, FORMATS, count_samples, write_sample_shards
from .group import cli
from .logs import quiet_option


@cli.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", type=click.Choice(DATASETS), default="digits", show_default=True,
              help="digits: sklearn's 1797 labelled digits; photos: augmented scikit-image sample photos, 6 classes of 2-4 photos (probe --group-field photo).")
@click.option("--shard-size", type=click.IntRange(min=1), default=500, show_default=True, help="Samples per shard.")
@click.option("--image-size", type=click.IntRange(8, 4096), default=224, show_default=True, help="Square image side, pixels.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Write only the first N samples (of the seeded order).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jpg", show_default=True,
              help="Image encoding; mixed picks JPEG or PNG per sample.")
@click.option("--variants", type=click.IntRange(min=1), default=20, show_default=True, help="Augmented variants per photo (photos only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample order and augmentation.")
@quiet_option()
@config_option
def sample_data(out: Path, dataset: str, shard_size: int, image_size: int, limit: int | None, fmt: str,
                variants: int, seed: int) -> None:
    """Write a labelled sample dataset to OUT as WebDataset tar shards (OUT/<dataset>-000000.tar, ...)."""
    paths = write_sample_shards(out, dataset=dataset, shard_size=shard_size, image_size=image_size,
                                limit=limit, fmt=fmt, variants=variants, seed=seed)
    n = count_samples(dataset, limit, variants)
    click.echo(f"wrote {len(paths)} shard{'s' * (len(paths) != 1)}, {n} samples to {out}")
