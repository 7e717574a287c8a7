"""Adaptive batching inside the serving process: requests that arrive while the model is busy ride
together in the next batch.

    await batcher(x)          one preprocessed image (C x H x W) -> its row of the model's output

One batch runs at a time, in a worker thread (onnxruntime releases the GIL, so the event loop keeps
parsing and decoding the next requests meanwhile). When a batch finishes, everything queued since
(up to max_batch_size) becomes the next batch. Nothing waits for a batch to fill: one client gets
batch 1 and no added latency; under concurrency the batch grows to the number of requests that
arrived during one model call, which is what makes throughput grow with load.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger("ctsynth.serving")


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)


@dataclass
class _Pending:
    item: np.ndarray
    result: asyncio.Future = field(repr=False)


class ContinuousBatcher:
    """Merges concurrent single-item calls into batches of `run_batch` (N x ... -> N x ...)."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.stats = BatchStats()
        self._queue: list[_Pending] = []
        self._worker: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One thread: batches run one after another, in arrival order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctsynth-batch")

    async def __call__(self, item: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # Created on first use: the server's event loop does not exist when the service is built.
            self._loop = loop
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._drain_forever(), name="ctsynth-batcher")
        pending = _Pending(item, loop.create_future())
        self._queue.append(pending)
        self._wake.set()
        return await pending.result

    async def _drain_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[: self.max_batch_size]
                del self._queue[: self.max_batch_size]
                batch = [p for p in batch if not p.result.done()]  # a client that went away was cancelled
                if not batch:
                    continue
                try:
                    outputs = await loop.run_in_executor(self._executor, self.run_batch, np.stack([p.item for p in batch]))
                    if len(outputs) != len(batch):
                        raise RuntimeError(f"the model returned {len(outputs)} rows for a batch of {len(batch)}")
                except Exception as exc:  # every caller in the batch gets the error; the loop goes on
                    log.exception("batch of %d failed", len(batch))
                    for p in batch:
                        if not p.result.done():
                            p.result.set_exception(exc)
                    continue
                self.stats.record(len(batch))
                for p, output in zip(batch, outputs):
                    if not p.result.done():
                        p.result.set_result(output)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
