"""Which DataLoader worker reads which shard: whole shards per worker (as webdataset's ``split_by_worker``), so
that each shard is opened, downloaded and decompressed once in all, whatever the number of workers."""
from __future__ import annotations

from typing import Callable, Sequence

from .tar import can_seek


def shard_owners(urls: Sequence[str], workers: int) -> list[int | None]:
    """The worker that reads each shard whole, or None for a shard split between all workers (each reads the
    samples :func:`owns` gives it); a pure function of the shard list and the worker count, so every worker
    process computes the same plan on its own.

    Shard j is worker ``j % workers``'s. Only the tail is split, the last ``len(urls) % workers`` shards (all of
    them when there are fewer shards than workers), so that no worker idles while the others finish it. A split
    shard is read by seeking over the data of the samples a worker does not own (its data is read once in all,
    its 512-byte headers once per worker), so only shards that can seek are split: a ``pipe:``, downloaded or
    compressed tail shard stays whole with one worker, since splitting it would read (download, decompress) it
    once per worker.

    Example:
        >>> shard_owners(["a.tar", "b.tar", "c.tar"], 2)  # c.tar: every other sample for each worker
        [0, 1, None]
        >>> shard_owners(["a.tar", "b.tar", "c.tar.gz"], 2)  # a compressed tail stays whole
        [0, 1, 0]
    """
    if workers <= 1:
        return [0] * len(urls)
    tail = len(urls) - len(urls) % workers
    return [None if j >= tail and can_seek(url) else j % workers for j, url in enumerate(urls)]


def owns(worker: int, workers: int) -> Callable[[int], bool]:
    """Whether ``worker`` reads the i-th sample of a split shard: every ``workers``-th one, from its own id."""
    return lambda i: i % workers == worker
