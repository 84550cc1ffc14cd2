"""Image queries that arrive together go through the model as one call, on the model thread, off the event loop.

The first query of a batch waits at most ``wait_s`` for company (or until ``max_batch`` images are queued);
while one batch runs on the model thread, the queries arriving meanwhile queue up and form the next one, so
under load batches grow by themselves and an idle service answers a lone query after ``wait_s``.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable, Sequence

import numpy as np


class Batcher:
    """Collects lists of prepared images from concurrent requests and embeds them with one ``embed`` call."""

    def __init__(self, embed: Callable[[list[Any]], np.ndarray], executor: Executor, wait_s: float, max_batch: int):
        self.embed_fn, self.executor = embed, executor
        self.wait_s, self.max_batch = wait_s, max_batch
        self.pending: list[tuple[Sequence[Any], asyncio.Future]] = []
        self.queued = 0  # images in `pending`
        self.more = asyncio.Event()  # set when enough images are queued to stop waiting
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.images = 0

    async def embed(self, images: Sequence[Any]) -> np.ndarray:
        """The embeddings of ``images`` (float32 ``[len(images), D]``), computed together with other requests'."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((images, fut))
        self.queued += len(images)
        if self.queued >= self.max_batch:
            self.more.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            if self.queued < self.max_batch and self.wait_s > 0:
                self.more.clear()
                try:
                    await asyncio.wait_for(self.more.wait(), self.wait_s)
                except asyncio.TimeoutError:
                    pass
            take, n = [], 0
            while self.pending and (not take or n + len(self.pending[0][0]) <= self.max_batch):
                item = self.pending.pop(0)
                take.append(item)
                n += len(item[0])
            self.queued -= n
            flat = [im for images, _ in take for im in images]
            try:
                x = await loop.run_in_executor(self.executor, self.embed_fn, flat)
            except Exception as e:  # every request of the batch gets the error (a model error is not theirs alone)
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.images += n
            start = 0
            for images, fut in take:
                if not fut.done():  # a client that went away cancelled its future
                    fut.set_result(x[start:start + len(images)])
                start += len(images)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else None}
