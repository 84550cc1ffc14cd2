"""`embedpipe probe`, `predict` and `knn`: the frozen-feature evaluation commands."""
from __future__ import annotations

from typing import Any

import click

from ..config import config_option
from ..model.specs import DEFAULT_MODEL
from ..probe.options import (
    KNN_KS,
    KNN_TEMPERATURE,
    METHODS,
    PREDICT_BATCH,
    FinetuneOptions,
    ProbeOptions,
)
from .group import cli
from .logs import quiet_option

D, F = ProbeOptions, FinetuneOptions  # the defaults shown here are the probe stage's own
CLASS_NAMES_HELP = ("Names of integer labels: one per line (line i names label i) or a JSON object {label: name} "
                    "[default: the json column's label field or the txt column, where it names each label one-to-one].")
GROUP_HELP = ("Field (dotted path) of the JSON column: rows sharing its value (the variants of one photo) stay on one "
              "side of the key-hash split.")


def _floats(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[float, ...] | None:
    """Comma-separated numbers on the command line, or a TOML list from --config."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return tuple(float(v) for v in items if str(v).strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@cli.command()
@click.argument("emb_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Probe folder (head.pt, metrics.json, report.txt).")
@click.option("--label-column", default=None, help="Column holding the label [default: label, or json with --label-field].")
@click.option("--label-field", default=None, help="Field (dotted path) inside the JSON column holding the label, e.g. 'species'.")
@click.option("--class-names", default=None, type=click.Path(dir_okay=False), help=CLASS_NAMES_HELP)
@click.option("--group-field", default=None, help=GROUP_HELP)
@click.option("--val", default=None, type=click.Path(), help="Validation embedding folder (default: a key-hash split of EMB_DIR).")
@click.option("--val-fraction", type=float, default=D.val_fraction, show_default=True, help="Share of each class held out when --val is not given.")
@click.option("--weight-decays", callback=_floats, default=None, help="L2 strengths to try, comma-separated [default: 1e-6..1e-1, 11 values].")
@click.option("--learning-rates", callback=_floats, default=None, help="Learning rates to try with --method sgd [default: 0.001,0.01,0.1].")
@click.option("--method", type=click.Choice(METHODS), default=D.method, show_default=True, help="auto: full-batch L-BFGS when the features fit --max-memory-gb, else streamed SGD.")
@click.option("--max-memory-gb", type=float, default=D.max_memory_gb, show_default=True)
@click.option("--max-iter", type=int, default=D.max_iter, show_default=True, help="L-BFGS iterations.")
@click.option("--epochs", type=int, default=D.epochs, show_default=True, help="SGD epochs.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="SGD mini-batch.")
@click.option("--standardize/--no-standardize", default=D.standardize, show_default=True, help="Scale features to zero mean, unit variance (folded into the saved head).")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--plots", is_flag=True, help="Also write confusion.png (needs the 'plots' extra: matplotlib).")
@click.option("--export-classifier", type=click.Path(dir_okay=False), default=None, help="Also write a TorchScript classifier for raw images (backbone + this head).")
@click.option("--zero-shot", "zero_shot", default=None, help="Image-text models: no training, a head of these class names, comma-separated (integer labels: the i-th name is label i).")
@click.option("--classes-file", default=None, type=click.Path(dir_okay=False), help="--zero-shot's class names from a file, one a line.")
@click.option("--template", "templates", multiple=True, help="Zero-shot prompt with {} for the class name (repeatable: ensembled) [default: 'a photo of a {}.'].")
@quiet_option(expose=True)
@config_option
def probe(emb_dir: str, out: str, weight_decays: tuple[float, ...] | None, learning_rates: tuple[float, ...] | None,
          export_classifier: str | None, quiet: bool, zero_shot: str | None, classes_file: str | None,
          templates: tuple[str, ...], **opts: Any) -> None:
    """Train a linear probe on an embedding folder; keep the best L2 strength on validation. With --zero-shot (an
    image-text model's embeddings), write a head of class-name prompts instead, evaluated on the same split.

    \b
    Examples:
      embedpipe probe runs/digits --out runs/digits-probe --plots
      embedpipe probe runs/clip --out runs/clip-zs --zero-shot "cat,dog,car" --template "a photo of a {}."
    """
    from ..probe.evaluate import report
    from ..probe.linear import run_probe

    if zero_shot is not None or classes_file is not None or templates:
        _zero_shot(emb_dir, out, zero_shot, classes_file, templates, export_classifier, quiet, opts)
        return
    if weight_decays:
        opts["weight_decays"] = weight_decays
    if learning_rates:
        opts["learning_rates"] = learning_rates
    options = ProbeOptions(**opts)
    options.check()
    if export_classifier:
        from ..probe.export import check_exportable

        check_exportable(emb_dir)
    m = run_probe(emb_dir, out, options)
    if not quiet:
        click.echo(report(m))
    hp = m["hyperparameters"]
    line = (f"probe: top-1 {m['top1'] * 100:.2f}%" + (f", top-5 {m['top5'] * 100:.2f}%" if "top5" in m else "")
            + f" on {m['n_val']} val rows, {m['num_classes']} classes, {m['split']['train']} train rows; "
            f"{hp['method']} wd={hp['weight_decay']:g}" + (f" lr={hp['learning_rate']:g}" if "learning_rate" in hp else "")
            + f", {len(m['grid'])} heads in {m['train_seconds']:.1f}s -> {out}")
    if export_classifier:
        from ..probe.export import export_classifier as run_export

        run_export(out, export_classifier)
        line += f"; classifier {export_classifier}"
    click.echo(line)


def _zero_shot(emb_dir: str, out: str, names: str | None, classes_file: str | None, templates: tuple[str, ...],
               export_classifier: str | None, quiet: bool, opts: dict[str, Any]) -> None:
    from ..probe.evaluate import report
    from ..probe.zero_shot import check_templates, class_names, run_zero_shot

    chosen = class_names(names, classes_file)
    check_templates(templates)
    options = ProbeOptions(**opts)
    options.check()
    if export_classifier:
        from ..probe.export import check_exportable

        check_exportable(emb_dir)
    m = run_zero_shot(emb_dir, out, chosen, templates, options)
    if not quiet:
        click.echo(report(m))
    line = (f"zero-shot: {m['num_classes']} classes, {m['hyperparameters']['templates']} template(s), "
            + (f"top-1 {m['top1'] * 100:.2f}%" + (f", top-5 {m['top5'] * 100:.2f}%" if "top5" in m else "")
               + f" on {m['n_val']} val rows (the linear probe's split)" if "top1" in m else "not evaluated (no labels)")
            + f" -> {out}")
    if export_classifier:
        from ..probe.export import export_classifier as run_export

        run_export(out, export_classifier)
        line += f"; classifier {export_classifier}"
    click.echo(line)


@cli.command()
@click.argument("probe_dir", type=click.Path())
@click.argument("emb_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Prediction folder [default: PROBE_DIR/predictions].")
@click.option("--batch-size", type=int, default=PREDICT_BATCH, show_default=True)
@quiet_option()
@config_option
def predict(probe_dir: str, emb_dir: str, out: str | None, batch_size: int) -> None:
    """Classify every embedding with a trained probe: key, class, class_name, probability -> Parquet.

    Example: embedpipe predict runs/digits-probe runs/new --out runs/new/predictions
    """
    from ..probe.predict import run_predict

    r = run_predict(probe_dir, emb_dir, out, batch_size=batch_size)
    click.echo(f"predict: {r['rows']} rows from {r['files']} shard(s) -> {r['out']}")


@cli.command()
@click.argument("emb_dir", type=click.Path())
@click.option("--val", default=None, type=click.Path(), help="Validation (query) embedding folder (default: a key-hash split of EMB_DIR).")
@click.option("--val-fraction", type=float, default=D.val_fraction, show_default=True)
@click.option("--label-column", default=None, help="Column holding the label [default: label].")
@click.option("--label-field", default=None, help="Field inside the JSON column holding the label.")
@click.option("--class-names", default=None, type=click.Path(dir_okay=False), help=CLASS_NAMES_HELP)
@click.option("--group-field", default=None, help=GROUP_HELP)
@click.option("-k", "--k", "ks", type=int, multiple=True, default=KNN_KS, show_default=True, help="Neighbours (repeat for several).")
@click.option("--temperature", type=float, default=KNN_TEMPERATURE, show_default=True, help="Vote weight exp(cosine / T).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@quiet_option()
@config_option
def knn(emb_dir: str, ks: tuple[int, ...], **opts: Any) -> None:
    """k-NN accuracy (cosine, weighted vote) of validation rows against training rows.

    Example: embedpipe knn runs/digits -k 10 -k 20
    """
    from ..probe.knn import run_knn

    r = run_knn(emb_dir, ks=ks, **opts)
    parts = [f"k={k} top-1 {acc * 100:.2f}%" for k, acc in r["top1"].items()]
    click.echo(f"knn: {', '.join(parts)} on {r['n_val']} val rows against {r['n_train']} train rows, "
               f"{r['num_classes']} classes ({r['seconds']:.1f}s)")


@cli.command()
@click.argument("shards", nargs=-1)
@click.option("--val", "val_shards", multiple=True, required=True, help="Validation shards (repeat, or a brace range).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder: checkpoint.pt, metrics.json, classifier.pt.")
@click.option("--unfreeze", type=int, default=F.unfreeze, show_default=True, help="Train the last N blocks (0: head only).")
@click.option("--model", default=F.model, show_default=True, help=f"Backbone (default: {DEFAULT_MODEL}).")
@click.option("--weights", default=F.weights, show_default=True)
@click.option("--input-size", type=int, default=None, help="Square input side (default: the model's).")
@click.option("--epochs", type=int, default=F.epochs, show_default=True)
@click.option("--batch-size", type=int, default=F.batch_size, show_default=True)
@click.option("--lr", type=float, default=F.lr, show_default=True, help="Head learning rate (AdamW, cosine schedule).")
@click.option("--backbone-lr-factor", type=float, default=F.backbone_lr_factor, show_default=True, help="Backbone lr = lr x this.")
@click.option("--weight-decay", type=float, default=F.weight_decay, show_default=True)
@click.option("--hflip/--no-hflip", default=F.hflip, show_default=True, help="Random horizontal flips.")
@click.option("--label-field", default=None, help="Label from this .json field instead of .cls.")
@click.option("--class-names", default=None, type=click.Path(dir_okay=False), help=CLASS_NAMES_HELP)
@click.option("--device", default=F.device, show_default=True, help="auto (CUDA if visible, else CPU), cpu, cuda, cuda:N.")
@click.option("--workers", type=int, default=F.workers, show_default=True)
@click.option("--seed", type=int, default=F.seed, show_default=True)
@click.option("--compare-probe/--no-compare-probe", default=F.compare_probe, show_default=True, help="Also fit a linear probe on the same split.")
@quiet_option()
@config_option
def finetune(shards: tuple[str, ...], val_shards: tuple[str, ...], out: str, **opts: Any) -> None:
    """Fine-tune the head and the last N blocks on tar shards (resumes from OUT/checkpoint.pt).

    Example: embedpipe finetune 'data/train-{000000..000009}.tar' --val data/val-000000.tar --out runs/ft --unfreeze 2
    """
    from ..probe.finetune import run_finetune

    r = run_finetune(list(shards), list(val_shards), out, FinetuneOptions(**opts))
    epochs = r["options"]["epochs"]
    for h in r["history"]:
        loss = "n/a" if h["train_loss"] is None else f"{h['train_loss']:.3f}"
        click.echo(f"epoch {h['epoch'] + 1}/{epochs}: val top-1 {h['val_top1'] * 100:.2f}% (train loss {loss})")
    best = (f"best val top-1 {r['best_val_top1'] * 100:.2f}% at epoch {r['best_epoch'] + 1}/{epochs}"
            if r["best_epoch"] is not None else "no epoch trained")
    probe = f", linear probe {r['probe_top1'] * 100:.2f}% (frozen features, same split)" if r["probe_top1"] is not None else ""
    click.echo(f"finetune: {best} after {len(r['history'])} epoch(s){probe}; "
               f"trained {', '.join(r['trained_blocks']) or 'head only'}" + (f" -> {r['classifier']}" if r.get("classifier") else ""))
