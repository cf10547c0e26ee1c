"""The files of an upload handed from the event loop to a store writer in a worker thread,
chunk by chunk: at most `depth` chunks wait between the two, so an upload of any size
holds a few chunks of memory. The writer's sync API (`write_blob(name, chunks)`) is kept:
it reads an iterator that blocks until the loop hands it the next chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
DEPTH = 4
_END, _ABORT = object(), object()


class _Aborted(Exception):
    """The upload failed on the loop's side: the writer drops the file it was writing."""


async def write_files(chunks: AsyncIterable[tuple[str, bytes]], write: Callable[[str, Iterator[bytes]], T],
                      depth: int = DEPTH) -> list[T]:
    """Call `write(name, its chunks)` in a worker thread per file of `chunks` ((name, data),
    a file's chunks together, as `convert.Upload.chunks` yields them); returns what each
    call returned. An error of either side is raised once the writer thread has stopped
    (and so has removed its partial file)."""
    loop, results, feed = asyncio.get_running_loop(), [], None
    try:
        async for name, data in chunks:
            if feed is None or feed.name != name:
                if feed is not None:
                    results.append(await feed.finish())
                feed = _Feed(name, write, depth, loop)
            await feed.put(data)
        if feed is not None:
            results.append(await feed.finish())
    except BaseException:
        if feed is not None:
            await feed.abort()
        raise
    return results


class _Feed:
    """One file: a bounded queue on the loop, read by `write` in a worker thread."""

    def __init__(self, name: str, write: Callable, depth: int, loop: asyncio.AbstractEventLoop) -> None:
        self.name, self._loop = name, loop
        self._queue: asyncio.Queue = asyncio.Queue(depth)
        self._task = asyncio.ensure_future(asyncio.to_thread(write, name, self._chunks()))
        self._task.add_done_callback(lambda _: self._empty())  # a writer that failed unblocks put()

    async def put(self, data: bytes) -> None:
        await self._queue.put(data)
        if self._task.done():
            self._task.result()  # the writer failed: its error
            raise RuntimeError(f"the writer of {self.name!r} stopped before the end of its file")

    async def finish(self):
        await self._queue.put(_END)
        return await self._task

    async def abort(self) -> None:
        if not self._task.done():
            self._empty()
            self._queue.put_nowait(_ABORT)
        await asyncio.wait({self._task})
        if not self._task.cancelled():
            self._task.exception()  # retrieved: the error being raised is the caller's

    def _empty(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    def _chunks(self) -> Iterator[bytes]:
        """The writer thread's side."""
        while True:
            item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted(self.name)
            yield item
