"""APIFuture: one type for `.result()` and `await`."""

from __future__ import annotations

import asyncio
import threading

import pytest

import tunemesh
from tunemesh.futures import APIFuture


def resolve_later(future: APIFuture, value=None, error=None, delay=0.05) -> None:
    def run():
        if error is not None:
            future._set_exception(error)
        else:
            future._set_result(value)

    threading.Timer(delay, run).start()


def test_result_blocks_until_resolved():
    future: APIFuture[int] = APIFuture()
    assert not future.done()
    resolve_later(future, 7)
    assert future.result(timeout=5) == 7 and future.done()


def test_result_timeout_and_error():
    future: APIFuture[int] = APIFuture()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)
    future._set_exception(tunemesh.NotFoundError(reason="RUN_NOT_FOUND"))
    future._set_result(1)  # ignored: already resolved
    with pytest.raises(tunemesh.NotFoundError):
        future.result()
    assert isinstance(future.exception(), tunemesh.NotFoundError)


def test_await_from_asyncio_run_resolved_by_another_thread():
    async def main():
        first, second, failing = APIFuture(), APIFuture(), APIFuture()
        resolve_later(first, "a", delay=0.05)
        resolve_later(second, "b", delay=0.01)
        resolve_later(failing, error=tunemesh.InvalidArgumentError(reason="BAD"), delay=0.02)
        values = await asyncio.gather(first, second.coroutine())
        with pytest.raises(tunemesh.InvalidArgumentError):
            await failing
        return values

    assert asyncio.run(main()) == ["a", "b"]


def test_await_an_already_resolved_future_and_callbacks():
    future: APIFuture[int] = APIFuture()
    seen = []
    future.add_done_callback(lambda f: seen.append(f.result()))
    future._set_result(3)
    assert seen == [3]
    assert asyncio.run(_await(future)) == 3
    assert future.future().result() == 3


async def _await(future):
    return await future
