"""serving/batching.py: concurrent calls are merged into batches, each caller gets its own row, and a
failing batch fails only its own callers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import ContinuousBatcher


class SlowModel:
    """Row i of the output is 2 * input i; each call takes `seconds` and records its batch size."""

    def __init__(self, seconds: float = 0.02, fail_when=None) -> None:
        self.seconds = seconds
        self.fail_when = fail_when
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batch_sizes.append(len(batch))
        time.sleep(self.seconds)
        if self.fail_when is not None and self.fail_when(batch):
            raise ValueError("model failed")
        return batch * 2.0


def _items(n: int) -> list[np.ndarray]:
    return [np.full((1, 2, 2), float(i), np.float32) for i in range(n)]


def test_one_caller_gets_batches_of_one():
    model = SlowModel(seconds=0.0)
    batcher = ContinuousBatcher(model, max_batch_size=8)

    async def sequential():
        return [await batcher(x) for x in _items(5)]

    outputs = asyncio.run(sequential())
    assert model.batch_sizes == [1, 1, 1, 1, 1]
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out, np.full((1, 2, 2), 2.0 * i, np.float32))
    assert batcher.stats.batches == 5 and batcher.stats.images == 5
    batcher.close()


def test_concurrent_callers_are_batched_and_each_gets_its_own_row():
    model = SlowModel(seconds=0.05)
    batcher = ContinuousBatcher(model, max_batch_size=8)

    async def concurrent():
        return await asyncio.gather(*(batcher(x) for x in _items(20)))

    outputs = asyncio.run(concurrent())
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out, np.full((1, 2, 2), 2.0 * i, np.float32))
    # all 20 were queued before the first batch started: batches of at most 8, in arrival order
    assert model.batch_sizes == [8, 8, 4]
    assert batcher.stats.largest == 8 and batcher.stats.images == 20 and batcher.stats.batches == 3
    # the model ran off the event loop's thread, always on the same worker thread
    assert len(model.threads) == 1 and threading.main_thread().name not in model.threads
    batcher.close()


def test_calls_arriving_while_a_batch_runs_form_the_next_batch():
    model = SlowModel(seconds=0.1)
    batcher = ContinuousBatcher(model, max_batch_size=64)

    async def scenario():
        first = asyncio.ensure_future(batcher(_items(1)[0]))
        await asyncio.sleep(0.03)  # the first batch is now running in the worker thread
        rest = [asyncio.ensure_future(batcher(x)) for x in _items(6)[1:]]
        return await first, await asyncio.gather(*rest)

    asyncio.run(scenario())
    assert model.batch_sizes == [1, 5]  # no waiting for a batch to fill, no batch of one for each


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    model = SlowModel(seconds=0.02, fail_when=lambda batch: bool((batch == 3.0).any()))
    batcher = ContinuousBatcher(model, max_batch_size=4)

    async def scenario():
        first = await asyncio.gather(*(batcher(x) for x in _items(6)), return_exceptions=True)
        later = await batcher(np.full((1, 2, 2), 7.0, np.float32))
        return first, later

    first, later = asyncio.run(scenario())
    failed = [i for i, result in enumerate(first) if isinstance(result, ValueError)]
    assert 3 in failed  # the batch holding item 3 failed as a whole ...
    assert any(isinstance(result, np.ndarray) for result in first)  # ... the other batches did not
    np.testing.assert_array_equal(later, np.full((1, 2, 2), 14.0, np.float32))


def test_a_model_returning_the_wrong_number_of_rows_is_an_error():
    batcher = ContinuousBatcher(lambda batch: batch[:1], max_batch_size=4)

    async def scenario():
        return await asyncio.gather(*(batcher(x) for x in _items(3)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "1 rows for a batch of 3" in str(r) for r in results)


def test_a_cancelled_caller_is_dropped_from_its_batch():
    model = SlowModel(seconds=0.05)
    batcher = ContinuousBatcher(model, max_batch_size=8)

    async def scenario():
        blocker = asyncio.ensure_future(batcher(_items(1)[0]))
        await asyncio.sleep(0.01)  # the blocker's batch is running
        gone = asyncio.ensure_future(batcher(_items(2)[1]))
        kept = asyncio.ensure_future(batcher(_items(3)[2]))
        await asyncio.sleep(0)
        gone.cancel()
        return await blocker, await kept

    _, kept = asyncio.run(scenario())
    np.testing.assert_array_equal(kept, np.full((1, 2, 2), 4.0, np.float32))
    assert model.batch_sizes == [1, 1]


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ContinuousBatcher(lambda b: b, max_batch_size=0)
