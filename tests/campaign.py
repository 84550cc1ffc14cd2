"""How much of a fault campaign the suite runs: one case of each by default (the suite stays under its time
budget on 2 cores), every case with ``EMBEDPIPE_CAMPAIGN=1`` (``make test-campaign``)."""
from __future__ import annotations

import os

FULL = os.environ.get("EMBEDPIPE_CAMPAIGN", "") not in ("", "0")


def cases(first: list, more: list) -> list:
    """``first`` always; ``more`` too in a full campaign."""
    return first + more if FULL else first
