"""Options of ``embedpipe probe`` and ``embedpipe finetune`` (the CLI reads its defaults from here), checked up front."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..model.device import DEVICE_AUTO

DEFAULT_WDS = tuple(float(v) for v in np.logspace(-6, -1, 11))  # 1e-6 .. 1e-1 in half-decade steps
DEFAULT_LRS = (1e-3, 1e-2, 1e-1)
METHODS = ("auto", "lbfgs", "sgd")
VAL_FRACTION = 0.2  # share of each class held out when no validation folder is given (probe and k-NN)
KNN_KS = (10, 20)
KNN_TEMPERATURE = 0.07  # DINO's vote weight exp(cosine / T)
PREDICT_BATCH = 65536


def check_class_names_file(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise UserError(f"--class-names {path} does not exist; give a file of one name per line (line i names label "
                        "i), or a JSON object {\"<label>\": \"<name>\", ...}")


@dataclass(frozen=True)
class ProbeOptions:
    """Every option of ``embedpipe probe``; validated before any data is read."""

    label_column: str | None = None
    label_field: str | None = None
    group_field: str | None = None  # rows sharing this json field's value stay on one side of the split
    class_names: str | None = None  # a file naming the integer labels (probe/classes.py)
    val: str | None = None
    val_fraction: float = VAL_FRACTION
    weight_decays: tuple[float, ...] = DEFAULT_WDS
    learning_rates: tuple[float, ...] = DEFAULT_LRS  # streaming (SGD) only
    method: str = "auto"  # auto | lbfgs | sgd
    max_memory_gb: float = 4.0
    max_iter: int = 500
    epochs: int = 10
    batch_size: int = 1024
    standardize: bool = True
    seed: int = 0
    plots: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method must be {', '.join(METHODS)}, got {self.method!r}")
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise UserError("--weight-decays needs one or more values >= 0, e.g. 1e-6,1e-4,1e-2")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise UserError("--learning-rates needs one or more values > 0, e.g. 0.001,0.01,0.1")
        if self.val is None and not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.val is not None and self.group_field:
            raise UserError("--group-field groups the rows of the split of EMB_DIR; with --val there is no split: "
                            "drop one of them")
        check_class_names_file(self.class_names)
        for name in ("max_iter", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_memory_gb <= 0:
            raise UserError(f"--max-memory-gb must be > 0, got {self.max_memory_gb}")
        if self.plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UserError("--plots needs matplotlib: pip install 'embedpipe[plots]'") from None


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of ``embedpipe finetune``."""

    unfreeze: int = 1
    model: str = "default"
    weights: str = "default"
    input_size: int | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3  # head
    backbone_lr_factor: float = 0.1  # backbone blocks get lr * factor
    weight_decay: float = 0.05
    hflip: bool = True
    label_field: str | None = None
    class_names: str | None = None
    device: str = DEVICE_AUTO
    workers: int = 0
    seed: int = 0
    compare_probe: bool = True
    stop_after: int | None = None  # stop after this many epochs in this run (tests, time-boxed jobs)

    def check(self) -> None:
        check_class_names_file(self.class_names)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.unfreeze < 0:
            raise UserError("--unfreeze must be >= 0 (0 trains the head only)")
        if self.lr <= 0 or self.backbone_lr_factor < 0:
            raise UserError("--lr must be > 0 and --backbone-lr-factor >= 0")
