"""Log lines for people and cron logs: timestamped, our progress at INFO by default, ``-q`` for warnings only."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import click

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (the CLI can run many times in one process, e.g. in tests)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(verbose: int = 0, quiet: bool = False) -> None:
    """embedpipe's own INFO lines (what is happening: compiling, tuning, ...) show by default; other libraries'
    only from WARNING. ``-q``: warnings only; ``-v``: our DEBUG lines; ``-vv``: everyone's."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _CurrentStderr)]:
        root.removeHandler(h)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    ours = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.getLogger("pipeline").setLevel(ours)


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        logging.getLogger("pipeline").setLevel(logging.WARNING)
    return value


def quiet_option(expose: bool = False) -> Callable[[Any], Any]:
    """``-q/--quiet`` for a long-running command: warnings and the summary line only, no progress bar."""
    return click.option("-q", "--quiet", is_flag=True, expose_value=expose, callback=_quiet,
                        help="Only warnings and the summary line: no progress bar or progress log lines.")
