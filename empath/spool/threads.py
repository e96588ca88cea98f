"""A small thread pool for blocking spool calls (write, fdatasync, rename, fsync) that hands
results back to the event loop in batches.

``loop.run_in_executor`` costs a concurrent.futures.Future, an asyncio future chained to it and
one ``call_soon_threadsafe`` (a self-pipe write) per call. At thousands of messages a second
those wake-ups and lock handoffs are a large part of a receiver's CPU. Here a call is a tuple on
a ``SimpleQueue``; a finished call is appended to a list, and only the first finisher of a
batch wakes the loop, which then settles every finished future in one callback.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


class SpoolThreads:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int,
                 name: str = "spool") -> None:
        self._loop = loop
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._calls.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            with self._lock:
                first = not self._done
                self._done.append((fut, result, error))
            if first:
                try:
                    self._loop.call_soon_threadsafe(self._settle)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return

    def _settle(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for fut, result, error in done:
            if fut.cancelled():
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def shutdown(self) -> None:
        """Let queued calls finish, then stop the threads."""
        for _ in self._threads:
            self._calls.put(None)
        for t in self._threads:
            t.join()
