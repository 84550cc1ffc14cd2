"""How good a probe is: top-1/top-5, per-class accuracy, the confusion matrix as text, report and PNG."""
from __future__ import annotations

import io
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import UserError


def evaluate(head: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> dict[str, Any]:
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
    zs = metrics.get("zero_shot")
    about = (f"zero-shot: {len(metrics['classes'])} class names, templates {zs['templates']}, logit scale "
             f"{zs['logit_scale']:g}" if zs else None)
    if "top1" not in metrics:  # a zero-shot head of a folder without labels
        return f"{about}\nnot evaluated: the embeddings have no labels"
    chosen = ", ".join(f"{k}={v:g}" for k, v in hp.items() if k in ("weight_decay", "learning_rate"))
    lines = [f"top-1 {metrics['top1'] * 100:.2f}% on {metrics['n_val']} validation rows"
             + (f", top-5 {metrics['top5'] * 100:.2f}%" if "top5" in metrics else ""),
             about or f"chosen: {chosen} ({hp.get('method', '?')}, standardize={hp.get('standardize')})"]
    if metrics.get("split", {}).get("class_names"):
        lines.append(f"class names: from {metrics['split']['class_names']}")
    lines.append("per-class accuracy:")
    for name, pc in metrics["per_class"].items():
        acc = "   n/a" if pc["accuracy"] is None else f"{pc['accuracy'] * 100:6.2f}%"
        lines.append(f"  {name}: {acc}  (n={pc['support']})")
    lines.append(confusion_text(metrics["confusion"], metrics["classes"]))
    return "\n".join(lines)


def plot_confusion(conf: np.ndarray, names: list[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix as PNG bytes, titled, with class names (and counts when they fit);
    needs matplotlib (``pip install 'embedpipe[plots]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'embedpipe[plots]'") from None
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = min(4 + 0.35 * len(names), 30)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 50:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    if len(names) <= 20:  # the counts themselves, readable at this size
        for i, j in zip(*np.nonzero(conf)):
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix (rows: true class, normalised)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def confusion_title(metrics: dict[str, Any]) -> str:
    """``linear probe: top-1 95.3% (top-5 99.7%) on 359 validation rows, 10 classes``"""
    top5 = f" (top-5 {metrics['top5'] * 100:.1f}%)" if "top5" in metrics else ""
    what = "zero-shot" if "zero_shot" in metrics else "linear probe"
    return (f"{what}: top-1 {metrics['top1'] * 100:.1f}%{top5} on {metrics['n_val']} validation rows, "
            f"{metrics['num_classes']} classes")
