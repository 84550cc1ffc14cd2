"""A trained probe on disk (head.pt, metrics.json, report), its metrics, and `predict` over embedding shards."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from . import store
from .errors import UserError

log = logging.getLogger(__name__)

HEAD_FORMAT = "embedpipe-probe/1"
PREDICTIONS = "predictions"
PREDICTION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                               ("class", pa.int64()), ("class_name", pa.string()), ("probability", pa.float32())])


@dataclass
class Head:
    """A linear classifier on raw stored embeddings: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    classes: list[Any]  # label values, index = class id
    label_source: dict[str, Any]
    feature_spec: dict[str, Any]  # embedding metadata: model, weights_sha256, normalize, dim, ...

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.classes]

    def logits(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        return torch.addmm(self.bias, x.float(), self.weight.T)

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                "classes": list(self.classes), "class_names": self.class_names,
                "label_source": self.label_source, "feature_spec": self.feature_spec}

    def linear(self) -> torch.nn.Linear:
        """The head as ``nn.Linear(D, C)`` (what replaces a backbone's classifier)."""
        lin = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.copy_(self.bias)
        return lin


def load_head(probe_dir: str | Path) -> Head:
    """Read ``PROBE_DIR/head.pt`` (plain tensors, lists and dicts: loads with ``weights_only=True``)."""
    p = Path(probe_dir)
    if p.is_dir():
        store.recover_files(p)  # a probe killed mid-commit: finish it, so head.pt matches metrics.json
    f = p / "head.pt" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"no probe head at {f}; train one with `embedpipe probe EMB_DIR --out {p}`")
    d = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
        raise UserError(f"{f} is not an embedpipe probe head (expected format {HEAD_FORMAT!r})")
    return Head(d["weight"].float(), d["bias"].float(), d["classes"], d["label_source"], d["feature_spec"])


def evaluate(head: Head, batches: Iterable[tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5 (when there are more than 5 classes), per-class accuracy and the confusion matrix."""
    c = len(class_names)
    conf = np.zeros((c, c), dtype=np.int64)
    top5 = 0
    for x, y in batches:
        z = head.logits(x)
        pred = z.argmax(1).numpy()
        np.add.at(conf, (np.asarray(y), pred), 1)
        if c > 5:
            top5 += int((z.topk(5, dim=1).indices == torch.as_tensor(y)[:, None]).any(1).sum())
    n = int(conf.sum())
    if n == 0:
        raise UserError("no labelled validation rows to evaluate on")
    support = conf.sum(1)
    per_class = {name: {"accuracy": float(conf[i, i] / support[i]) if support[i] else None, "support": int(support[i])}
                 for i, name in enumerate(class_names)}
    out = {"top1": float(np.trace(conf) / n), "n_val": n, "num_classes": c, "classes": class_names,
           "per_class": per_class, "confusion": conf.tolist()}
    if c > 5:
        out["top5"] = top5 / n
    return out


def confusion_text(conf: np.ndarray | list, names: list[str], max_classes: int = 20) -> str:
    """The confusion matrix as aligned text (rows: true, columns: predicted), or the top confusions when large."""
    conf = np.asarray(conf)
    if len(names) > max_classes:
        off = conf.copy()
        np.fill_diagonal(off, 0)
        pairs = sorted(((off[i, j], names[i], names[j]) for i, j in zip(*np.nonzero(off))), reverse=True)[:15]
        return "top confusions (true -> predicted: count)\n" + "\n".join(f"  {t} -> {p}: {n}" for n, t, p in pairs)
    w = max(4, max(len(n) for n in names), len(str(conf.max())))
    head = " " * (w + 1) + " ".join(n[:w].rjust(w) for n in names)
    rows = [names[i][:w].rjust(w) + " " + " ".join(str(v).rjust(w) for v in conf[i]) for i in range(len(names))]
    return "confusion (rows: true, columns: predicted)\n" + "\n".join([head, *rows])


def report(metrics: dict[str, Any]) -> str:
    """The human-readable probe report (also saved as ``report.txt``)."""
    hp = metrics.get("hyperparameters", {})
    chosen = ", ".join(f"{k}={v:g}" for k, v in hp.items() if k in ("weight_decay", "learning_rate"))
    lines = [f"top-1 {metrics['top1'] * 100:.2f}% on {metrics['n_val']} validation rows"
             + (f", top-5 {metrics['top5'] * 100:.2f}%" if "top5" in metrics else ""),
             f"chosen: {chosen} ({hp.get('method', '?')}, standardize={hp.get('standardize')})",
             "per-class accuracy:"]
    for name, pc in metrics["per_class"].items():
        acc = "   n/a" if pc["accuracy"] is None else f"{pc['accuracy'] * 100:6.2f}%"
        lines.append(f"  {name}: {acc}  (n={pc['support']})")
    lines.append(confusion_text(metrics["confusion"], metrics["classes"]))
    return "\n".join(lines)


def save_probe(out: Path, head: Head, metrics: dict[str, Any], plots: bool = False) -> None:
    """Write ``head.pt``, ``metrics.json``, ``report.txt`` (and ``confusion.png`` with plots), as one commit."""
    import io

    buf = io.BytesIO()
    torch.save(head.to_dict(), buf)
    files = {"head.pt": buf.getvalue(),
             "metrics.json": (json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n").encode(),
             "report.txt": (report(metrics) + "\n").encode()}
    if plots:
        files["confusion.png"] = plot_confusion(np.asarray(metrics["confusion"]), metrics["classes"])
    store.write_files_atomic(out, files)  # all of them or none: a killed probe leaves the previous set


def plot_confusion(conf: np.ndarray, names: list[str]) -> bytes:
    """Row-normalised confusion matrix as PNG bytes (needs matplotlib: ``pip install 'embedpipe[plots]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'embedpipe[plots]'") from None
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = min(4 + 0.35 * len(names), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 50:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def check_features(head: Head, info: store.ShardInfo) -> None:
    """The embeddings must come from the model the head was trained on."""
    spec = head.feature_spec
    if info.dim != spec.get("dim"):
        raise UserError(f"{info.path}: embeddings have dim {info.dim}, the probe expects {spec.get('dim')}; "
                        "embed with the model the probe was trained on")
    for k in ("model", "weights_sha256", "layer", "normalize"):
        if k in spec and k in info.metadata and spec[k] != info.metadata[k]:
            raise UserError(f"{info.path}: embeddings have {k}={info.metadata[k]!r}, the probe was trained on "
                            f"{k}={spec[k]!r}; re-embed with the probe's model or train a new probe")


def run_predict(probe_dir: str | Path, emb_dir: str | Path, out: str | Path | None = None,
                batch_size: int = 65536) -> dict[str, Any]:
    """Predict every row of ``emb_dir``; one Parquet file per embedding shard under ``out``.

    Columns: ``key``, ``shard``, ``index``, ``class`` (int64 class id, index into head.pt ``classes``),
    ``class_name`` (string) and ``probability`` (float32 softmax of the predicted class).

    Example:
        >>> run_predict("runs/probe", "runs/new-images", "runs/new-images/predictions")["rows"]
    """
    head = load_head(probe_dir)
    files = store.list_shards(emb_dir)
    infos = [store.shard_info(f) for f in files]
    store.check_consistent(infos)
    for info in infos:
        check_features(head, info)
    out_dir = Path(out) if out else Path(probe_dir) / PREDICTIONS
    names = np.array(head.class_names, dtype=object)
    rows = 0
    for f in files:
        parts = []
        for b in store.iter_batches(None, batch_size=batch_size, files=[f]):
            with torch.no_grad():
                p = torch.softmax(head.logits(b.embeddings), 1)
            prob, cls = p.max(1)
            parts.append(pa.table([b.keys, b.shards, b.indices.astype(np.int32), cls.numpy(),
                                   names[cls.numpy()].tolist(), prob.numpy().astype(np.float32)],
                                  schema=PREDICTION_SCHEMA))
        table = pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table()
        store.write_table_atomic(out_dir / f.name, table)
        rows += table.num_rows
    log.info("predicted %d rows into %s", rows, out_dir)
    return {"rows": rows, "files": len(files), "out": str(out_dir)}
