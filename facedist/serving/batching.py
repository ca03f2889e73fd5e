"""Greedy request batching for a replica: concurrent calls grouped into one model call.

Not @serve.batch: in the Ray this project runs (2.60; since it gained max_concurrent_batches) it
closes a batch every batch_wait_timeout_s whether or not the previous one has finished, and the
closed batches queue behind the running one. Under load a replica then runs many small batches (the calls that arrived
within one timeout: 3 to 6 images where 16 were waiting) and loses what batching saves. Here the
next batch is taken when the running one ends, from everything waiting by then (up to
max_batch_size); only a batch that starts on an idle replica waits up to batch_wait_timeout_s to
fill.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


class Batcher:
    """`await batcher.submit(item)` -> handle_batch's answer for that item. handle_batch takes a
    list of items and returns one answer per item, in order; one batch runs at a time. A caller
    cancelled while its item waits (its request's deadline passed, its client left) is left out
    of the batch."""

    def __init__(self, handle_batch: Callable[[list], Awaitable[list]], max_batch_size: int,
                 batch_wait_timeout_s: float):
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"need max_batch_size >= 1 ({max_batch_size}) and "
                             f"batch_wait_timeout_s >= 0 ({batch_wait_timeout_s})")
        self.handle_batch = handle_batch
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # made on the replica's loop, at first use
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        return await future  # cancelling the caller cancels the future: its item is skipped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._waiting = [entry for entry in self._waiting if not entry[1].done()]
            if not self._waiting:
                # Idle: wait for a call, then let its batch fill for a moment (the other images
                # of its request, concurrent requests' images).
                self._arrived.clear()
                await self._arrived.wait()
                fill_by = loop.time() + self.batch_wait_timeout_s
                while len(self._waiting) < self.max_batch_size and loop.time() < fill_by:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), fill_by - loop.time())
                    except TimeoutError:
                        break
                continue  # cancelled calls are dropped above, then the batch runs
            # Calls that came while a batch ran go at once: they have waited already.
            batch, self._waiting = self._waiting[:self.max_batch_size], self._waiting[self.max_batch_size:]
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            answers = await self.handle_batch([item for item, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} got {len(answers)} answers")
        except Exception as exc:  # every caller of the batch gets the error, the worker goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), answer in zip(batch, answers):
            if not future.done():
                future.set_result(answer)
