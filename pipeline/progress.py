"""Progress of a long step: a bar on a terminal, timestamped log lines elsewhere (cron, Slurm, Kubernetes logs).

Quiet (``-q``, or the ``pipeline`` logger above INFO) shows neither; the command's summary line still prints.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts items (images, vectors, batches) towards an optional ``total``, with a free-text ``status``.

    Example:
        >>> with Progress(log, "embed", total=1000, unit="img") as p:  # doctest: +SKIP
        ...     p.update(64); p.status("shards 1/4")
    """

    def __init__(self, log: logging.Logger, desc: str, total: int | None = None, unit: str = "img",
                 every: float = 30.0, enabled: bool = True):
        self.log, self.desc, self.total, self.unit, self.every = log, desc, total, unit, every
        self.done, self.text, self.estimated = 0, "", False
        self.start = self.last = time.monotonic()
        shown = enabled and log.isEnabledFor(logging.INFO)
        self.bar: Any = None
        self.lines = shown and not sys.stderr.isatty()
        if shown and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, smoothing=0.1, unit_scale=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_total(self, total: int | None, estimated: bool = False) -> None:
        """The total, once known (``estimated``: extrapolated, e.g. from the shards done so far)."""
        self.total, self.estimated = total, estimated
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def status(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text + (" (total estimated)" if self.estimated else ""), refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last >= self.every:
            self._line()

    def line(self) -> str:
        """``embed: 1200/5000 img (24%), 98.4 img/s, ETA 0:00:38, shards 3/10`` (what the log lines say)."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{'~' if self.estimated else ''}{self.total}" if self.total else "")
                 + f" {self.unit}" + (f" ({100 * self.done / self.total:.0f}%)" if self.total else ""),
                 f"{rate:.1f} {self.unit}/s"]
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_eta((self.total - self.done) / rate)}")
        if self.text:
            parts.append(self.text)
        return ", ".join(parts)

    def _line(self) -> None:
        self.last = time.monotonic()
        state = (self.done, self.total, self.estimated, self.text)  # what a line says, but for its rate
        if state != getattr(self, "_said", None):
            self._said = state
            self.log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.done:
            self._line()
            self.lines = False
