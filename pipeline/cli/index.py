"""`embedpipe index`, `index-merge` and `search`: build, merge and query FAISS indexes of embedding shards."""
from __future__ import annotations

from typing import Any

import click

from ..config import config_option
from ..index.choose import KINDS, METRICS
from ..index.options import DEFAULT_TARGET_RECALL, IndexConfig
from ..index.query import FORMATS
from .group import cli
from .logs import quiet_option

D = IndexConfig  # the defaults shown here are the index stage's own


def _params(ctx: click.Context, param: click.Parameter, value: Any) -> dict[str, int] | None:
    """``nprobe=32,efSearch=64`` (or a TOML table) → dict."""
    if not value:
        return None
    if isinstance(value, dict):
        return {str(k): int(v) for k, v in value.items()}
    out = {}
    for item in str(value).split(","):
        name, sep, v = item.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"expected NAME=INT[,NAME=INT], e.g. nprobe=32, got {value!r}")
        out[name.strip()] = int(v)
    return out


@cli.command()
@click.argument("emb_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index directory (index.faiss, ids.parquet, index.json).")
@click.option("--kind", type=click.Choice(KINDS), default=D.kind, show_default=True,
              help="auto: exact (Flat) up to 50,000 vectors; above, each kind that fits --memory is built on a "
                   "sample and the fastest at --target-recall is kept.")
@click.option("--factory", default=None, help="Any FAISS index_factory string (e.g. 'OPQ32,IVF4096,PQ32'); overrides --kind.")
@click.option("--metric", type=click.Choice(METRICS), default=D.metric, show_default=True, help="ip matches normalised embeddings.")
@click.option("--memory", default=D.memory, show_default=True, help="Memory budget for the index, e.g. 8GB, 512MB.")
@click.option("--target-recall", type=float, default=None, help=f"recall@10 vs exact search the tuned nprobe/efSearch must reach.  [default: {DEFAULT_TARGET_RECALL}; --update keeps the index's recorded target]")
@click.option("--queries", type=int, default=D.queries, show_default=True, help="Held-out rows used as tuning queries (at most a fifth of the set).")
@click.option("--update", is_flag=True, help="Add shards not indexed yet to the existing index (no retraining).")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT (or retrain with --train-only) even if it exists.")
@click.option("--parts", type=int, default=None, help="Build the index in N parts (with --part I), merged by `index-merge`.")
@click.option("--part", type=int, default=None, help="Which part (0..N-1) this job builds.")
@click.option("--train-only", is_flag=True, help="Only train the shared quantizer that --parts builds against.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Rows read per batch while adding.")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed of the training/query sample.")
@click.option("--text-queries", default=None, help="Image-text models: texts (a file, one per line) whose recall is measured and recorded [default: built-in prompts; 'none': skip].")
@quiet_option()
@config_option
def index(**options: Any) -> None:
    """Build a FAISS index of the embedding shards in EMB_DIR, tuned against exact search.

    \b
    Examples:
      embedpipe index runs/a --out runs/a/index
      embedpipe index runs/a --out runs/a/index --update          # add new shards (cron)
      embedpipe index runs/a --out idx --kind ivf --train-only     # then, per Slurm array task:
      embedpipe index runs/a --out idx --parts 8 --part $SLURM_ARRAY_TASK_ID
      embedpipe index-merge idx
    """
    from ..index.build import run_index

    res = run_index(IndexConfig(**options))
    click.echo(res["summary"])


@cli.command("index-merge")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--target-recall", type=float, default=DEFAULT_TARGET_RECALL, show_default=True, help="recall@10 the tuned nprobe must reach.")
@click.option("--overwrite", is_flag=True, help="Replace INDEX_DIR if it exists.")
@quiet_option()
@config_option
def index_merge(index_dir: str, target_recall: float, overwrite: bool) -> None:
    """Merge the parts in INDEX_DIR.parts/ into INDEX_DIR (FAISS on-disk inverted lists), then tune nprobe."""
    from ..index.options import check_target_recall
    from ..index.parts import run_merge

    check_target_recall(target_recall)
    click.echo(run_merge(index_dir, target_recall, overwrite)["summary"])


@cli.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("query", required=False)
@click.option("--key", "keys", multiple=True, help="Key of an indexed item (repeatable); the item itself is excluded.")
@click.option("--key-shard", default=None, help="With --key: the shard holding the key (url, end of its path or file name), for keys several shards hold.")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False), help="Image file to embed with the index's model (repeatable).")
@click.option("--text", "texts", multiple=True, help="Text query, embedded with the text tower of the index's image-text model (repeatable).")
@click.option("--texts-file", "texts_from", type=click.Path(dir_okay=False), default=None, help="File of text queries, one per line.")
@click.option("--vectors", type=click.Path(dir_okay=False), default=None, help="Parquet file of query embeddings ('embedding' column, optional 'key').")
@click.option("--embeddings", type=click.Path(), default=None, help="Embedding folder: every item in it is a query.")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=FORMATS[0], show_default=True)
@click.option("--include-self", is_flag=True, help="Keep the query item in its own results, flagged as self.")
@click.option("--params", callback=_params, default=None, help="Override tuned search parameters, e.g. nprobe=64.")
@click.option("--embeddings-source", type=click.Path(), default=None, help="Where the indexed embedding folder lives now, if it moved.")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="Also write a page with the query and neighbour images (with --key/--image/--text).")
@quiet_option()
@config_option
def search(index_dir: str, query: str | None, **options: Any) -> None:
    """Nearest neighbours in INDEX_DIR of QUERY: an indexed key, an image, a text, a vectors .parquet or an embedding folder.

    \b
    Examples:
      embedpipe search runs/a/index 000123 -k 5
      embedpipe search runs/a/index 000123 --key-shard run2/00000.tar
      embedpipe search runs/a/index --image cat.jpg --format json
      embedpipe search runs/clip/index --text "a red car" --text "a dog on a beach"
      embedpipe search runs/a/index --vectors queries.parquet --format jsonl
    """
    from ..index.query import run_search

    prev = None  # results stream to stdout batch by batch; the last chunk is the summary line, on stderr
    for chunk in run_search(index_dir, query, keys=options.pop("keys"), images=options.pop("images"),
                            texts=options.pop("texts"), **options):
        if prev is not None:
            click.echo(prev)
        prev = chunk
    click.echo(prev, err=True)
