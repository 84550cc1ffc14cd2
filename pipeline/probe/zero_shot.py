"""Zero-shot classification from class names: a probe head made of prompt embeddings, no training.

Each class's prompts (``"a photo of a {}."``, or ``--template`` repeated) are embedded by the text tower of the
image-text model the embeddings record, normalised, averaged and normalised again (CLIP's prompt ensembling);
the head's rows are those class embeddings times the model's logit scale, its bias zero, so ``logits = scale *
cosine`` as CLIP's own zero-shot classifier computes them. It is written in the linear probe's head format
(``probe/head.py``), so ``predict`` and ``--export-classifier`` take it unchanged. When the folder has labels the
head is evaluated exactly as the linear probe is: top-1 / top-5 on the same validation rows (``labels.split_rows``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from .. import store
from ..errors import UserError
from .evaluate import evaluate
from .head import Head, save_probe
from .labels import ClassMap, LabelSource, load_split
from .options import ProbeOptions

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."


def class_names(names: str | None, path: str | None) -> list[str]:
    """``--zero-shot "cat,dog,car"`` or ``--classes-file FILE`` (one name a line): the class names, in order."""
    if (names is None) == (path is None):
        raise UserError("give the class names once: --zero-shot 'cat,dog,car' or --classes-file FILE")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--classes-file {p} does not exist; write one class name per line")
        out = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        out = [n.strip() for n in str(names).split(",") if n.strip()]
    if len(out) < 2:
        raise UserError(f"zero-shot classification needs two or more class names, got {out}")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise UserError(f"class names given twice: {dup}; each class is one name")
    return out


def check_templates(templates: Sequence[str]) -> list[str]:
    """Prompt templates, each holding ``{}`` once (where the class name goes)."""
    out = list(templates) or [DEFAULT_TEMPLATE]
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise UserError(f"--template {bad[0]!r} must hold '{{}}' once, where the class name goes, e.g. "
                        f"{DEFAULT_TEMPLATE!r}")
    return out


def class_embeddings(embedder: Any, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``[C, D]``: per class, its prompts' normalised embeddings averaged, then normalised (CLIP's ensembling)."""
    rows = []
    for name in names:
        e = torch.from_numpy(embedder.embed_texts([t.format(name) for t in templates])).float()
        e = torch.nn.functional.normalize(e, dim=1).mean(0)
        rows.append(torch.nn.functional.normalize(e, dim=0))
    return torch.stack(rows)


def _has_labels(emb_dir: str | Path, source: LabelSource) -> bool:
    """Whether the folder's rows carry labels of ``source`` to evaluate with (a column with some non-null values)."""
    for f in store.list_shards(emb_dir):
        if source.column not in pq.read_schema(f).names:
            return False
    if source.field is not None or source.column != "label":
        return True  # a json field: the split says whether any row has it
    return any(pq.read_table(f, columns=["label"]).column("label").null_count < pq.read_metadata(f).num_rows
               for f in store.list_shards(emb_dir))


def _head_ids(cmap: ClassMap, names: list[str], where: str | Path) -> np.ndarray:
    """The head row of each class id of ``cmap``: string labels are class names; integer label ``i`` is the
    ``i``-th name."""
    if cmap.classes and isinstance(cmap.classes[0], str):
        missing = [c for c in cmap.classes if c not in names]
        ids = [names.index(c) if c in names else -1 for c in cmap.classes]
    else:
        missing = [c for c in cmap.classes if not 0 <= int(c) < len(names)]
        ids = [int(c) for c in cmap.classes]
    if missing:
        raise UserError(f"labels {missing[:5]} of {where} have no class name among the {len(names)} given; give a "
                        "name for every label (integer labels: the i-th name is label i; text labels: the label "
                        "itself)")
    return np.array(ids, np.int64)


def run_zero_shot(emb_dir: str | Path, out: str | Path, names: Sequence[str], templates: Sequence[str] = (),
                  opts: ProbeOptions | None = None) -> dict[str, Any]:
    """Write a zero-shot head for ``names`` to ``out`` (``head.pt``, ``metrics.json``, ``report.txt``), evaluated
    on the linear probe's validation rows when the folder has labels.

    Example:
        >>> m = run_zero_shot("runs/clip", "runs/clip-zs", ["cat", "dog"], ["a photo of a {}."])  # doctest: +SKIP
        >>> m["top1"]  # doctest: +SKIP
    """
    opts = opts or ProbeOptions()
    opts.check()
    names, templates = list(names), check_templates(templates)
    t0 = time.perf_counter()
    meta = store.shard_info(store.list_shards(emb_dir)[0]).metadata
    if meta is None:
        raise UserError(f"{emb_dir}: the embeddings record no model, so class names cannot be embedded like them; "
                        "embed with `embedpipe embed --model open_clip:ARCH/PRETRAINED`")
    from ..model.rebuild import TextEmbedder

    embedder = TextEmbedder(meta)  # a model without a text tower: the error names it and what to use
    weight = class_embeddings(embedder, names, templates) * embedder.logit_scale
    source = LabelSource.make(opts.label_column, opts.label_field)
    head = Head(weight=weight, bias=torch.zeros(len(names)), classes=list(names), label_source=source.to_dict(),
                feature_spec=meta)
    about = {"templates": templates, "logit_scale": round(embedder.logit_scale, 4), "text_tower": dict(
        meta.identity.text_tower or {})}
    if _has_labels(emb_dir, source):
        _, val, cmap, split = load_split(emb_dir, source, opts.val, opts.val_fraction)
        y = _head_ids(cmap, names, emb_dir)[val.y]
        metrics = evaluate(head, [(val.x, y)], names)
        metrics["split"] = split
    else:
        log.info("%s has no labels (%s): the zero-shot head is written, not evaluated", emb_dir, source.describe())
        metrics = {"classes": names, "num_classes": len(names), "evaluated": False}
    metrics.update(zero_shot=about, hyperparameters={"method": "zero-shot", "templates": len(templates)},
                   train_seconds=round(time.perf_counter() - t0, 3), emb_dir=str(emb_dir), options=asdict(opts))
    save_probe(Path(out), head, metrics, plots=opts.plots and "confusion" in metrics)
    return metrics
