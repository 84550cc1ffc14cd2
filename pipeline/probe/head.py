"""A trained probe on disk: the linear head (``head.pt``, plain tensors), its metrics and report, swapped in as one."""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import atomic, store
from ..errors import UserError
from ..records import EmbeddingMeta
from .evaluate import confusion_title, plot_confusion, report

log = logging.getLogger(__name__)

HEAD_FORMAT = "embedpipe-probe/1"
HEAD_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE = "head.pt", "metrics.json", "report.txt", "confusion.png"
PROBE_FILES = (HEAD_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE)  # one set: a new probe replaces them all


@dataclass(repr=False)
class Head:
    """A linear classifier on raw stored embeddings: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    classes: list[Any]  # label values, index = class id
    label_source: dict[str, Any]
    feature_spec: EmbeddingMeta | None  # the metadata of the embeddings it was trained on (None: they had none)
    names: list[str] | None = None  # the classes' names where the labels are numbers (probe/classes.py)

    @property
    def class_names(self) -> list[str]:
        return list(self.names) if self.names else [str(c) for c in self.classes]

    def __repr__(self) -> str:
        shown = ", ".join(self.class_names[:5]) + (", ..." if len(self.classes) > 5 else "")
        return (f"Head({self.weight.shape[0]} classes [{shown}] on dim {self.weight.shape[1]} features of "
                f"{self.feature_spec.model if self.feature_spec else '?'})")

    def predict(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Class ids and their softmax probability for embeddings ``x`` ``[N, D]`` (as stored)."""
        with torch.no_grad():
            prob, cls = torch.softmax(self.logits(x), 1).max(1)
        return cls.numpy(), prob.numpy()

    def logits(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        return torch.addmm(self.bias, x.float(), self.weight.T)

    def to_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                "classes": list(self.classes), "class_names": self.class_names,
                "label_source": self.label_source,
                "feature_spec": self.feature_spec.to_dict() if self.feature_spec else {"dim": self.weight.shape[1]}}

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
        atomic.recover_files(p)  # an older version's probe killed mid-commit: finish it (head.pt matches metrics)
    f = p / HEAD_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"no probe head at {f}; train one with `embedpipe probe EMB_DIR --out {p}`")
    d = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
        raise UserError(f"{f} is not an embedpipe probe head (expected format {HEAD_FORMAT!r})")
    spec = d["feature_spec"]  # {"dim": D} alone when the embeddings recorded no model
    meta = EmbeddingMeta.from_dict(spec, f"{f}: feature_spec") if "model" in spec else None
    names = d.get("class_names")  # what every head wrote; named classes since issue 26
    return Head(d["weight"].float(), d["bias"].float(), d["classes"], d["label_source"], meta,
                names if names and names != [str(c) for c in d["classes"]] else None)


def save_probe(out: Path, head: Head, metrics: dict[str, Any], plots: bool = False) -> None:
    """Write ``head.pt``, ``metrics.json``, ``report.txt`` (and ``confusion.png`` with plots), as one commit.

    The set is built in a sibling directory and swapped in with one ``renameat2(RENAME_EXCHANGE)``, like an
    index: a program reading the files directly sees all old or all new ones, even if the probe is killed.
    Other files kept in the folder are carried over.
    """
    buf = io.BytesIO()
    torch.save(head.to_dict(), buf)
    files = {HEAD_FILE: buf.getvalue(),
             METRICS_FILE: (json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n").encode(),
             REPORT_FILE: (report(metrics) + "\n").encode()}
    if plots:
        files[CONFUSION_FILE] = plot_confusion(np.asarray(metrics["confusion"]), metrics["classes"],
                                               confusion_title(metrics))
    with atomic.locked_dir(out):
        if out.is_dir():  # a set an older version was committing file by file: finish it, drop its temporaries
            atomic.recover_files(out)
            atomic.remove_stale_temps(out, [*PROBE_FILES, atomic.JOURNAL])
        with atomic.staged_dir(out, carry_except=PROBE_FILES) as tmp:
            for name, data in files.items():
                atomic.write_bytes(tmp / name, data)


def check_features(head: Head, info: store.ShardInfo) -> None:
    """The embeddings must come from the model the head was trained on."""
    dim = int(head.weight.shape[1])
    if info.dim != dim:
        raise UserError(f"{info.path}: embeddings have dim {info.dim}, the probe expects {dim}; "
                        "embed with the model the probe was trained on")
    spec, got = head.feature_spec, info.metadata
    if spec is None or got is None:
        return
    spec.identity.check_same(got.identity, str(info.path), "re-embed with the probe's model or train a new probe",
                             theirs="the probe")
    if spec.normalize != got.normalize:  # besides the model, the head needs features normalised as in training
        raise UserError(f"{info.path}: embeddings have normalize={got.normalize!r}, the probe was trained on "
                        f"normalize={spec.normalize!r}; re-embed with the probe's settings or train a new probe")
