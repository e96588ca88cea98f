"""A small thread pool for blocking spool calls (write, fdatasync, rename) with a group-commit
thread for the directory fsync, handing results back to the event loop in batches.

``loop.run_in_executor`` costs a concurrent.futures.Future, an asyncio future chained to it and
one ``call_soon_threadsafe`` (a self-pipe write) per call. At thousands of messages a second
those wake-ups and lock handoffs are a large part of a receiver's CPU. Here a call is a tuple on
a ``SimpleQueue``; a finished call is appended to a list, and only the first finisher of a
batch wakes the loop, which then settles every finished future in one callback.

A call submitted with ``sync_dir=True`` (a rename into the directory ``sync_fd`` names) is not
finished when its function returns: the thread hands it to the committer thread, which runs
one ``sync(sync_fd)`` (``fsync``, or ``syncfs`` for the whole filesystem) for every such call
handed over before it began, then finishes them all at once (with its error, if any). The
rename's durability costs the event loop nothing, and the sync never waits behind file
writes in the queue.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

Done = tuple[asyncio.Future[Any] | None, Any, BaseException | None]


class SpoolThreads:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str = "spool",
                 sync_fd: int = -1, on_synced: Callable[[], None] | None = None,
                 sync: Callable[[int], None] | None = None) -> None:
        self._loop = loop
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: list[Done] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        # Group commit: calls waiting for a directory fsync, and the thread that runs it.
        self._sync_fd = sync_fd
        # os.fsync (of the directory, the default), or syncfs (its whole filesystem)
        self._sync = sync if sync is not None else os.fsync
        self._on_synced = on_synced
        self._unsynced: list[tuple[asyncio.Future[Any], Any]] = []
        self._sync_wanted = threading.Condition(threading.Lock())
        self._committer: threading.Thread | None = None
        if sync_fd >= 0:
            self._committer = threading.Thread(target=self._commit_loop,
                                               name=f"{name}-commit", daemon=True)
            self._committer.start()
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any,
               sync_dir: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._calls.put((fut, fn, args, sync_dir and self._committer is not None))
        return fut

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fut, fn, args, sync_dir = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            if sync_dir and error is None:
                with self._sync_wanted:
                    self._unsynced.append((fut, result))
                    self._sync_wanted.notify()
                continue
            if not self._finish([(fut, result, error)]):
                return

    def _commit_loop(self) -> None:
        while True:
            with self._sync_wanted:
                while not self._unsynced and not self._closed:
                    self._sync_wanted.wait()
                if not self._unsynced:
                    return
                batch, self._unsynced = self._unsynced, []
            error: BaseException | None = None
            try:
                self._sync(self._sync_fd)
            except OSError as exc:
                error = exc
            done: list[Done] = [(fut, result, error) for fut, result in batch]
            if error is None and self._on_synced is not None:
                done.append((None, self._on_synced, None))
            if not self._finish(done):
                return

    def _finish(self, done: list[Done]) -> bool:
        """Queue results for the loop, waking it if nobody has since it last settled;
        False when the loop is closed (nobody is waiting any more)."""
        with self._lock:
            first = not self._done
            self._done.extend(done)
        if first:
            try:
                self._loop.call_soon_threadsafe(self._settle)
            except RuntimeError:
                return False
        return True

    def _settle(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for fut, result, error in done:
            if fut is None:  # a callback for the loop (the committer's on_synced)
                result()
                continue
            if fut.cancelled():
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

    def shutdown(self) -> None:
        """Let queued calls finish (and their directory fsync), then stop the threads."""
        for _ in self._threads:
            self._calls.put(None)
        for t in self._threads:
            t.join()
        with self._sync_wanted:
            self._closed = True
            self._sync_wanted.notify()
        if self._committer is not None:
            self._committer.join()
