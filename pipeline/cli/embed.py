"""`embedpipe embed` and `embedpipe status`: the embed stage's commands."""
from __future__ import annotations

import json

import click

from ..config import config_option
from ..embedding.engines import engine_names
from ..embedding.options import OUT_DTYPES, EmbedConfig
from ..embedding.tar import KEEPABLE
from ..model.decoders import decoder_names
from ..model.device import COMPILE_CHOICES, PRECISION_CHOICES
from .group import cli
from .logs import quiet_option

D = EmbedConfig  # the defaults shown here are the embed stage's own
DECODE_CHOICES = ("auto", *decoder_names())  # decoder_names imports no decoder (nor torch)


@cli.command()
@click.argument("shards", nargs=-1)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (embeddings/, _state/, run.json).")
@click.option("--model", default=D.model, show_default=True, help="timm:<name>, torchvision:<name>, torchscript:<path> or an alias.")
@click.option("--weights", default=D.weights, show_default=True, help="default (embedded or downloaded), none (random), or a state-dict / .safetensors PATH.")
@click.option("--layer", default=None, help="Use the pooled output of this graph node (see `embedpipe models SPEC --nodes`).")
@click.option("--input-size", type=int, default=None, help="Crop size in pixels (default: the model's own).")
@click.option("--preprocess", default=None, help="A torchscript: file's preprocessing, replacing its preprocess.json or ImageNet's defaults: a JSON object or its FILE, with any of input_size, resize_size or crop_pct, interpolation (bilinear, bicubic), mean, std.")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_CHOICES), default=D.compile, show_default=True, help="auto: on a GPU the fastest of torchscript, inductor, max-autotune and aot, measured once per model and machine (minutes, then remembered); on a CPU the mode with the least expected time for the run's images (setup + images / rate, each measured once here; a small first run never waits for a long compile).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=D.precision, show_default=True, help="auto: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default=D.device, show_default=True, help="auto, cpu, cuda or cuda:N (one process).")
@click.option("--devices", default=None, help="One worker process per device: auto, cuda, N, cuda:0,cuda:2, cpu,cpu.")
@click.option("--engine", type=click.Choice(engine_names()), default=D.engine, show_default=True, help="local: this process; ray: a Ray Data actor pool (pip install 'embedpipe[ray]'); devices: what --devices with several devices runs.")
@click.option("--address", "ray_address", default=None, help="Ray cluster address (with --engine ray; default: start a local instance).")
@click.option("--rank", type=int, default=None, help="This task's part of the shards (default: SLURM_ARRAY_TASK_ID [x SLURM_NTASKS + SLURM_PROCID], RANK, SLURM_PROCID, JOB_COMPLETION_INDEX).")
@click.option("--world-size", type=int, default=None, help="Number of parts (default: SLURM_ARRAY_TASK_COUNT [x SLURM_NTASKS], WORLD_SIZE, SLURM_NTASKS, EMBEDPIPE_WORLD_SIZE).")
@click.option("--batch-size", type=int, default=None, help="Images decoded, embedded and written together (default: 64 on CPU; on GPU the fastest of 64-512, measured once per model and machine).")
@click.option("--micro-batch", type=int, default=None, help="Images per model call within a batch (default: on CPU 4 or 8, measured once per model; whole batch on GPU; 0 = whole batch).")
@click.option("--workers", type=int, default=None, help="DataLoader decode workers per device (default: a quarter of the cores on CPU, 0 = decode in-process; all, up to 16, on GPU).")
@click.option("--decode", type=click.Choice(DECODE_CHOICES), default=D.decode, show_default=True, help="cpu: in the DataLoader workers; gpu: each batch in one nvJPEG call on the model's device (images it cannot decode go to the cpu decoder); auto: cpu on a CPU device, on a GPU the faster of the two, measured once per model and machine.")
@click.option("--out-dtype", type=click.Choice(OUT_DTYPES), default=D.out_dtype, show_default=True)
@click.option("--normalize/--no-normalize", default=D.normalize, show_default=True, help="L2-normalise embeddings.")
@click.option("--keep", default=",".join(D.keep), show_default=True,
              help=f"Sample fields kept as columns (subset of {','.join(KEEPABLE)}; '' for none).")
@click.option("--max-pixels", type=int, default=D.max_pixels, show_default=True, help="Images whose header claims more pixels are skipped (decompression bombs).")
@click.option("--max-member-mb", type=float, default=D.max_member_mb, show_default=True, help="Samples with an image, cls, txt or json member larger than this are skipped unread (sparse or zero-filled bombs); members of other fields are never read.")
@click.option("--max-shard-gb", type=float, default=D.max_shard_gb, show_default=True, help="A shard whose tar stream is longer than this after decompression fails (a gzip bomb); rerun with a larger value to retry it.")
@click.option("--cache-dir", default=None, help="Compiled-model cache (default $EMBEDPIPE_CACHE or ~/.cache/embedpipe).")
@click.option("--overwrite", is_flag=True, help="Replace embeddings made with different settings in --out.")
@quiet_option(expose=True)
@config_option
def embed(shards: tuple[str, ...], out: str, compile_mode: str, keep: str, **opts) -> None:
    """Embed WebDataset shards into Parquet files, one per shard (resumable)."""
    from ..embedding.runner import embed as run_embed
    from ..errors import UserError

    if not shards:
        raise UserError("no shards given: embedpipe embed 'data/shard-{000000..000009}.tar' --out OUT")
    summary = run_embed(list(shards), out, compile=compile_mode,
                        keep=tuple(k.strip() for k in keep.split(",") if k.strip()), **opts)
    click.echo(summary.line(), err=False)
    if summary.failed:
        click.echo(f"{len(summary.failed)} shard(s) failed (rerun the same command to retry them):", err=True)
        for url, reason in summary.failed.items():
            click.echo(f"  {url}: {reason}", err=True)
        click.get_current_context().exit(1)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(out: str, as_json: bool) -> None:
    """Show done, failed and pending shards of an embed output folder."""
    from ..embedding.folder_view import status as run_status

    st = run_status(out)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        click.echo(f"{out}: {st['done']}/{st['shards_expected']} shards done, {st['failed']} failed, "
                   f"{st['pending']} pending; {st['embedded']} samples embedded, {st['skipped']} skipped"
                   + ("; complete (_SUCCESS)" if st["success"] else "")
                   + (f"; the folder holds shards of more than one run (its last run had {st['shards_last_run']})"
                      if st["more_than_one_input_set"] else ""))
        for url, reason in st["failed_shards"].items():
            click.echo(f"  failed {url}: {reason}")
    if st["failed"]:
        click.get_current_context().exit(1)
