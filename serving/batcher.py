"""Opportunistic micro-batching: requests that arrive while the interpreter is busy share one call.

No request ever waits for a timer: the worker takes whatever is queued when it becomes
free (up to `max_batch`), so a lone request runs immediately and, under load, queued
requests are answered by one interpreter call. Items are grouped by the model object they
were submitted with, so a request that started before a hot swap still runs on its model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from serving.bundle import LoadedModel

log = logging.getLogger("serving.batcher")

Result = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # probabilities (C,), class_map (h,w,C), features (K,)


def split_outputs(outputs: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> list[Result]:
    """A batch's (probabilities, class maps, features or None) -> one Result per image."""
    probs, maps, feats = outputs
    return [(probs[i], maps[i], None if feats is None else feats[i]) for i in range(len(probs))]


class MicroBatcher:
    def __init__(self, max_batch: int, on_batch: Callable[[int], None] | None = None) -> None:
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[LoadedModel, np.ndarray, asyncio.Future[Result]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def predict(self, model: LoadedModel, images: np.ndarray) -> list[Result]:
        """Predict (n,S,S,3) images on `model`; batches with concurrent callers when enabled."""
        if self._queue is None or self.max_batch == 1 or len(images) >= self.max_batch:
            outputs = await asyncio.to_thread(model.predict_outputs, images)
            if self.on_batch:
                self.on_batch(len(images))
            return split_outputs(outputs)
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            fut: asyncio.Future[Result] = loop.create_future()
            self._queue.put_nowait((model, image, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            items = [await queue.get()]
            while len(items) < self.max_batch and not queue.empty():
                items.append(queue.get_nowait())
            groups: dict[int, list[tuple[LoadedModel, np.ndarray, asyncio.Future[Result]]]] = {}
            for item in items:
                groups.setdefault(id(item[0]), []).append(item)
            for group in groups.values():
                model = group[0][0]
                try:
                    batch = np.stack([g[1] for g in group])
                    probs, maps, feats = await asyncio.to_thread(model.predict_outputs, batch)
                    if self.on_batch:
                        self.on_batch(len(group))
                except Exception as exc:  # hand the error to each caller; the worker lives on
                    log.exception("inference failed for a batch of %d", len(group))
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for i, (_, _, fut) in enumerate(group):
                    if not fut.done():
                        fut.set_result((probs[i], maps[i], None if feats is None else feats[i]))
