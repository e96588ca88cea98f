"""The receiver's write path: make a message durable in incoming/ before its 250.

Per message: create ``tmp/<pid>-<id>`` (or take a file from recycle/: no inode to allocate),
write data + envelope + trailer (one writev for a message held in memory), fdatasync, close,
rename into ``incoming/`` — in a worker thread, in one compiled call without the GIL, so
sessions never wait behind each other's fsync and the kernel can overlap them. The rename is
made durable by an fsync of ``incoming/`` shared by every message renamed before that fsync
started (group commit): one directory fsync answers a whole batch of 250s. When the batch is
durable the delivery workers are woken.

Messages larger than SPILL_THRESHOLD are written to their tmp file as they arrive, so memory stays
bounded whatever the message size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from empath._speedups import store_file
from empath.observe import metrics
from empath.spool import fileformat
from empath.spool.layout import Spool, SpoolError, syncfs
from empath.spool.threads import SpoolThreads
from empath.spool.wake import Waker

SPILL_THRESHOLD = 256 * 1024
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, parts: list[bytes]) -> None:
    """writev until every byte is written (writev may write less than asked)."""
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class ReceiverWriter:
    """One per receiver process: the thread pool, the group commit and the waker."""

    def __init__(self, spool: Spool, threads: int = 16) -> None:
        self.spool = spool
        self._loop = asyncio.get_running_loop()
        # Paths of every message, built once: tmp/<pid>-<id> and incoming/<id> (bytes, for
        # store_file). The writer lives in one receiver process, so the pid is fixed.
        self.tmp_prefix = spool.tmp_path("", os.getpid())
        self.incoming_prefix = os.fsencode(spool.state_dir("incoming")) + b"/"
        self._dir_fd = os.open(spool.state_dir("incoming"), os.O_RDONLY | os.O_DIRECTORY)
        self._waker = Waker(spool)
        # Renames into incoming/ are made durable by the pool's group-commit thread; after
        # each of its fsyncs the delivery workers are woken.
        # With spool.sync "filesystem" one syncfs per batch replaces every file's fdatasync
        # and the directory fsync.
        self.datasync = spool.sync != "filesystem"
        self._pool = SpoolThreads(self._loop, threads, sync_fd=self._dir_fd,
                                  on_synced=self._waker.wake,
                                  sync=os.fsync if self.datasync else syncfs)
        # Write and commit latency histograms (no-ops when metrics are off).
        self.metrics = metrics.current()

    def begin(self, message_id: str) -> IncomingMessage:
        return IncomingMessage(self, message_id)

    def close(self) -> None:
        self._pool.shutdown()
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)
        self._waker.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._pool.submit(fn, *args)


class IncomingMessage:
    """A message being received: buffered in memory, spilled to tmp/ when large."""

    __slots__ = ("_writer", "id", "_chunks", "_buffered", "_size", "_fd", "_tmp", "_error",
                 "mtime")

    def __init__(self, writer: ReceiverWriter, message_id: str) -> None:
        self._writer = writer
        self.id = message_id
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._fd = -1
        self._tmp = ""
        self._error: OSError | None = None
        # When set, the file's mtime: its place in the delivery order of incoming/ (priority).
        self.mtime: float | None = None

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        """Append message bytes. A write error is kept and raised by commit()."""
        if not data or self._error is not None:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._size += len(data)
        if self._buffered >= SPILL_THRESHOLD:
            try:
                self._spill()
            except OSError as exc:
                self._error = exc
                self._discard()

    def _spill(self) -> None:
        if self._fd < 0:
            # A new file: recycled ones are small (at most 64 KiB), a spilled message is not.
            self._tmp = self._writer.tmp_prefix + self.id
            self._fd = os.open(self._tmp, _OPEN_FLAGS, 0o600)
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        _write_all(self._fd, chunks)

    async def add_header(self, make: Callable[[bytes], bytes | None]) -> None:
        """Put ``make(whole message)`` (a header, or None for nothing) at the top of the
        message. Runs in the writer's threads: it reads a spilled message back from disk."""
        if self._error is not None:
            return
        try:
            await self._writer._run(self._add_header, make)
        except OSError as exc:
            self._error = exc
            self._discard()

    def _add_header(self, make: Callable[[bytes], bytes | None]) -> None:
        spilled = b""
        if self._fd >= 0:
            spilled = os.pread(self._fd, self._size - self._buffered, 0)
        header = make(spilled + b"".join(self._chunks))
        if not header:
            return
        if self._fd >= 0:
            # A spilled message: the header goes first in a new file, then the old contents.
            old_fd, old_tmp = self._fd, self._tmp
            self._tmp = old_tmp + "+"
            self._fd = os.open(self._tmp, _OPEN_FLAGS, 0o600)
            _write_all(self._fd, [header, spilled])
            os.close(old_fd)
            os.unlink(old_tmp)
        else:
            self._chunks.insert(0, header)
            self._buffered += len(header)
        self._size += len(header)

    async def commit(self, envelope: dict[str, Any]) -> None:
        """Return once the message is durable in incoming/; SpoolError otherwise."""
        if self._error is not None:
            raise SpoolError(self._error.errno or 0, f"spool write failed: {self._error}")
        envelope["data_size"] = self._size
        tail = fileformat.encode_tail(envelope, self._size)
        started = time.monotonic()
        try:
            # Returns once the rename into incoming/ is covered by a directory fsync.
            write_seconds = await self._writer._pool.submit(self._store, tail, sync_dir=True)
        except OSError as exc:
            if self._tmp:  # the file write failed: nothing reached incoming/
                self._discard()
            else:  # the directory fsync failed: take the message back, it was not durable
                with contextlib.suppress(OSError):
                    os.unlink(self._writer.spool.path("incoming", self.id))
            raise SpoolError(exc.errno or 0, f"spool write failed: {exc}") from exc
        # Observed here, in the event loop: the instruments are not thread-safe.
        self._writer.metrics.spool_write.observe(write_seconds)
        self._writer.metrics.spool_commit.observe(time.monotonic() - started)

    def _store(self, tail: bytes) -> float:
        """Thread side: finish the tmp file (a recycled one when there is one), fdatasync,
        rename into incoming/; the seconds it took. One call of the compiled ``store_file``,
        which holds no GIL from the first syscall to the last."""
        writer = self._writer
        started = time.monotonic()
        fd, self._fd = self._fd, -1  # store_file closes it in every case
        reuse = None
        if fd < 0:
            self._tmp = writer.tmp_prefix + self.id
            reuse = writer.spool.take_recycled()
        chunks, self._chunks = self._chunks, []
        chunks.append(tail)
        # fdatasync covers the data and the size; the name is made durable by the directory
        # fsync of the group commit. A priority mtime is a scheduling hint, not state:
        # fdatasync may not persist it, and a message that loses its place after a crash is
        # merely delivered in arrival order.
        store_file(fd, os.fsencode(self._tmp), chunks, writer.incoming_prefix + self.id.encode(),
                   reuse, -1.0 if self.mtime is None else self.mtime, writer.datasync)
        self._tmp = ""
        return time.monotonic() - started

    def abort(self) -> None:
        """Discard the message (nothing durable was promised)."""
        self._chunks = []
        self._discard()

    def _discard(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = ""
