"""The replicas' batcher (facedist.serving.batching): what queued while a batch ran goes in the next
batch, whole; a cancelled call is left out; a failing batch fails its own callers only."""

from __future__ import annotations

import asyncio

import pytest

from facedist.serving.batching import Batcher


class GatedModel:
    """A batch handler that records its batches and, while `gate` is clear, holds each one."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if "bad" in items:
            raise ValueError("a bad item")
        return [f"answer to {item}" for item in items]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_calls_that_queued_behind_a_running_batch_go_in_the_next_one_whole():
    async def scenario():
        model = GatedModel()
        batcher = Batcher(model, max_batch_size=3, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()  # "a" runs alone and is held
        # One at a time, the event loop running between them: a batcher that closes a batch on a
        # clock (as @serve.batch does) would close one per item here.
        rest = []
        for item in "bcdef":
            rest.append(asyncio.ensure_future(batcher.submit(item)))
            for _ in range(5):
                await asyncio.sleep(0)
        model.gate.set()
        answers = await asyncio.gather(first, *rest)
        return model.batches, answers

    batches, answers = run(scenario())
    # Not one batch per wait timeout: everything that waited, in batches of the most allowed.
    assert batches == [["a"], ["b", "c", "d"], ["e", "f"]]
    assert answers == [f"answer to {item}" for item in "abcdef"]


def test_an_idle_batch_starts_once_it_is_full():
    async def scenario():
        model = GatedModel()
        model.gate.set()
        # A fill wait far longer than the test's own limit: only a full batch can start.
        batcher = Batcher(model, max_batch_size=2, batch_wait_timeout_s=3600)
        return await asyncio.gather(batcher.submit(1), batcher.submit(2)), model.batches

    answers, batches = run(scenario())
    assert batches == [[1, 2]] and answers == ["answer to 1", "answer to 2"]


def test_a_cancelled_call_is_left_out_of_its_batch():
    async def scenario():
        model = GatedModel()
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit("a"))
        await model.started.wait()
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        model.gate.set()
        await asyncio.gather(first, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches

    assert run(scenario()) == [["a"], ["kept"]]


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    async def scenario():
        model = GatedModel()
        model.gate.set()
        batcher = Batcher(model, max_batch_size=2, batch_wait_timeout_s=0.0)
        failed = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
        return failed, await batcher.submit("fine")

    failed, fine = run(scenario())
    assert isinstance(failed[0], ValueError) and fine == "answer to fine"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Batcher(GatedModel(), max_batch_size=0, batch_wait_timeout_s=0.05)
