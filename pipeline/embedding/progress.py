"""The embed progress: images embedded towards a total, shards done, an ETA; the same for every local engine.

The total is exact when img2dataset's ``_stats.json`` sidecars count every pending shard's samples;
otherwise it is extrapolated from the shards done so far (shown as estimated) once the first one is done.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ..progress import Progress
from .shards import sample_count

log = logging.getLogger(__name__)


class EmbedProgress(Progress):
    def __init__(self, pending: Sequence[str], quiet: bool = False):
        counts = [sample_count(u) for u in pending]
        known = sum(counts) if counts and all(c is not None for c in counts) else None
        super().__init__(log, "embed", total=known, unit="img", enabled=not quiet)
        self.shards = len(pending)
        self.exact = known is not None
        self.status(f"shards 0/{self.shards}")

    def shard_finished(self, summary: Any) -> None:
        """After each shard's outcome is in ``summary`` (an EmbedSummary of this run)."""
        finished = summary.finished
        self.status(f"shards {finished}/{self.shards}" + (f", {len(summary.failed)} failed" if summary.failed else ""))
        if not self.exact and summary.shards_done:  # committed shards' rows: the reader may be ahead of them
            per_shard = (summary.embedded + summary.skipped) / summary.shards_done
            self.set_total(max(self.done, round(per_shard * self.shards)), estimated=finished < self.shards)
        if self.lines:
            self._line()  # a log line per shard where there is no bar
