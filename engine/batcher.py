"""Dynamic micro-batching of image embeddings: concurrent image queries share one model call.

Request threads decode and preprocess their image and `submit` it (any item the batch function
takes: a PIL image or a preprocessed array); a batcher thread (one of `workers`) takes the first waiting
image, waits at most `max_wait_s` for more (up to `max_batch`), embeds them in one forward pass
and hands each caller its row. Under load the batches fill without waiting; alone, a query waits
at most max_wait_s. A model error reaches every caller of that batch.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from engine.errors import DeadlineExceeded, NotReady

logger = logging.getLogger("vitrine.engine")


@dataclasses.dataclass(frozen=True)
class BatcherConfig:
    """Micro-batching limits."""

    max_batch: int = 32  # most images per model call
    max_wait_s: float = 0.005  # longest the first image of a batch waits for company, seconds
    workers: int = 2  # batcher threads, each running its own batches (one per core with 1 torch thread each)


class MicroBatcher:
    """Embeds images submitted by many threads in batches, on one thread."""

    def __init__(self, embed_batch: Callable[[Sequence[Any]], np.ndarray], config: BatcherConfig,
                 observe_batch: Callable[[int], None] | None = None) -> None:
        if config.max_batch < 1 or config.max_wait_s < 0 or config.workers < 1:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {config}")
        self._embed_batch = embed_batch
        self.config = config
        self._observe_batch = observe_batch or (lambda size: None)
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"vitrine-batcher-{i}", daemon=True)
                         for i in range(config.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, image: Any) -> Future:
        """Queue one image (or preprocessed array); the future's result is its embedding row (float32 (dim,))."""
        if self._closed:
            raise NotReady("the server is shutting down; retry on another server")
        future: Future = Future()
        self._queue.put((image, future))
        return future

    def embed(self, images: Sequence[Any], deadline: float | None = None) -> np.ndarray:
        """Embeddings (n, dim) of `images`, batched with other callers'; DeadlineExceeded past `deadline`."""
        futures = [self.submit(image) for image in images]
        rows = []
        for future in futures:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if timeout is not None and not timeout <= threading.TIMEOUT_MAX:  # too far away (or inf) to wait on
                timeout = None
            try:
                rows.append(future.result(timeout=timeout))
            except FutureTimeout:
                raise DeadlineExceeded("the deadline passed while the query image waited to be embedded") from None
        return np.stack(rows)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            until = time.monotonic() + self.config.max_wait_s
            stop = False
            while len(batch) < self.config.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, until - time.monotonic())) \
                        if time.monotonic() < until else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # close(): one stop marker per worker
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[Any, Future]]) -> None:
        live = [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        self._observe_batch(len(live))
        try:
            vectors = self._embed_batch([image for image, _ in live])
        except Exception as exc:  # noqa: BLE001 - the callers get the model's error
            logger.exception("embedding a batch of %d images failed", len(live))
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), vector in zip(live, vectors, strict=True):
            future.set_result(vector)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the queued images, then stop the thread; later submits raise NotReady."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
