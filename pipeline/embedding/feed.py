"""The main process's side of the embed loop, in shard order: device decoding a batch ahead (a thread, on the
decode stream) and the model a batch behind (a batch's embeddings read after the next one is queued), so on a GPU
neither the host nor the device waits for the other once per batch."""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np

from ..model.streams import Pending, StreamedEmbedder, Streams
from .reader import Piece, ShardSamples

IN_FLIGHT = 1  # batches queued on the device beyond the one whose embeddings are being read


def decoded_ahead(pieces: Iterable[Piece], data: ShardSamples, streams: Streams) -> Iterator[tuple[Piece, Any]]:
    """Each piece with its images decoded, and the event after which they are ready (None: decoded in a worker).

    A piece the workers handed over encoded is decoded by one thread, on the decode stream, while this thread
    queues the model on the piece before it; one piece ahead, in order.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="device-decode")

    def decode(piece: Piece) -> tuple[Piece, Any]:
        with streams.on(streams.decode):
            piece = data.decode_encoded(piece, streams.device)
            return piece, streams.mark()

    queue: deque[Future | tuple[Piece, Any]] = deque()
    try:
        for piece in pieces:
            queue.append(pool.submit(decode, piece) if piece.encoded else (piece, None))
            # A piece decoded in a worker passes at once unless a decode is under way before it (order).
            while len(queue) > 1 or queue and not isinstance(queue[0], Future):
                yield _done(queue.popleft())
        while queue:
            yield _done(queue.popleft())
    finally:
        pool.shutdown(wait=True)  # a decode under way ends before the loader and its workers go


def _done(item: Future | tuple[Piece, Any]) -> tuple[Piece, Any]:
    return item.result() if isinstance(item, Future) else item


def embedded(ready: Iterable[tuple[Piece, Any]], embedder: StreamedEmbedder,
             in_flight: int = IN_FLIGHT) -> Iterator[tuple[Piece, np.ndarray | None]]:
    """Each piece with its embeddings (None when it has no rows), in order; a piece's embeddings are read once
    ``in_flight`` later batches are queued on the device (the last ones when the pieces end). A piece without rows
    (a worker's end of a shard) queues nothing, so it never makes the loop wait."""
    queue: deque[tuple[Piece, Pending | None]] = deque()
    queued = 0  # pieces in the queue with a batch on the device
    for piece, event in ready:
        job = embedder.submit(piece.images, event) if len(piece.keys) else None
        queue.append((piece, job))
        queued += job is not None
        while queue and (queue[0][1] is None or queued > in_flight):
            queued -= queue[0][1] is not None
            yield _collected(queue.popleft())
    while queue:
        yield _collected(queue.popleft())


def _collected(item: tuple[Piece, Pending | None]) -> tuple[Piece, np.ndarray | None]:
    piece, pending = item
    return piece, pending.result() if pending is not None else None
