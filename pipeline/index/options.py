"""The options of ``embedpipe index`` (one frozen record that build, parts and update all read), checked up front."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from .choose import METRICS, parse_memory
from .kinds import kind_names

DEFAULT_TARGET_RECALL = 0.95  # recall@10 against exact search that tuning aims at, unless --target-recall is given


@dataclass(frozen=True)
class IndexConfig:
    """Options of ``embedpipe index`` (checked by :meth:`validate` before any data is read)."""

    emb_dir: str
    out: str
    kind: str = "auto"
    factory: str | None = None
    metric: str = "ip"
    memory: str = "8GB"
    target_recall: float | None = None  # None: DEFAULT_TARGET_RECALL for a build, the recorded target for --update
    update: bool = False
    overwrite: bool = False
    parts: int | None = None
    part: int | None = None
    train_only: bool = False
    queries: int = 1000
    batch_size: int = 65536
    seed: int = 0
    text_queries: str | None = None  # an image-text model's recall texts: a file, none, or None (built-in prompts)

    def validate(self) -> int:
        """Check every option; returns the memory budget in bytes."""
        if self.kind != "auto" and self.kind not in kind_names():
            raise UserError(f"--kind {self.kind!r} is unknown; use one of auto, {', '.join(kind_names())} (or give any "
                            "FAISS index_factory string with --factory)")
        if self.factory and self.kind != "auto":
            raise UserError("give either --kind or --factory, not both")
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r} is unknown; use ip (normalised embeddings) or l2")
        if self.target_recall is not None:
            check_target_recall(self.target_recall)
        if self.queries < 1 or self.batch_size < 1:
            raise UserError("--queries and --batch-size must be positive")
        if (self.parts is None) != (self.part is None) and not self.train_only:
            raise UserError("--parts N and --part I go together (I in 0..N-1); --train-only needs neither")
        if self.parts is not None and self.part is not None and not 0 <= self.part < self.parts:
            raise UserError(f"--part {self.part} is out of range for --parts {self.parts}; use 0..{self.parts - 1}")
        if self.text_queries not in (None, "none") and not Path(self.text_queries).is_file():
            raise UserError(f"--text-queries {self.text_queries} does not exist; give a file of texts, one per line "
                            "(or 'none')")
        if self.update and (self.parts is not None or self.train_only or self.overwrite):
            raise UserError("--update adds new shards to an existing index; it cannot be combined with "
                            "--parts/--train-only/--overwrite")
        return parse_memory(self.memory)

    def resolved(self) -> IndexConfig:
        """These options with the recall target given, or else the default: what a build tunes at (``--update``
        reads the unresolved options, to tell a given target from none)."""
        return self if self.target_recall is not None else replace(self, target_recall=DEFAULT_TARGET_RECALL)

    def n_queries(self, n: int) -> int:
        """Held-out tuning queries: ``--queries``, but at most a fifth of the set."""
        return min(self.queries, max(1, n // 5))


def check_target_recall(target: float) -> None:
    if not 0 < target <= 1:
        raise UserError(f"--target-recall {target} must be in (0, 1], e.g. {DEFAULT_TARGET_RECALL}")
