"""The receiver's write path: make a message durable before its 250, with one flush.

Per message (``spool.sync: file``, the default): take a slot — a file in ``slots/`` whose name
the slot thread made durable ahead of use, a batch at a time (see slots.py) — write data +
envelope + trailer into it in place (one writev for a message held in memory), fdatasync,
close, link it into ``incoming/``: one compiled call in a thread of the ``StorePool``, C
threads that never take the GIL (the loop hands the call over and reads an eventfd when calls
have finished), so sessions never wait behind each other's flush, the kernel can overlap them,
and no GIL handoff is paid per message. The fdatasync is
the only flush the 250 waits for: the slot's name was durable before the write and stays until
the slot thread has flushed incoming/ (then it removes the slot names of a whole batch), so the
link needs no flush of its own. The envelope carries ``slot_check`` so that recovery after a
power cut can tell a complete message from a slot left half written. The delivery workers are
woken once per batch of stored messages.

Without a ready slot (a burst faster than the slot thread) a message is written as before:
``tmp/<pid>-<id>`` (or a file taken from recycle/), fdatasync, rename into ``incoming/``, and an
fsync of ``incoming/`` shared by every message renamed before it started (group commit). With
``spool.sync: filesystem`` every message takes that path, one ``syncfs`` per batch replacing
the fdatasyncs and the directory fsync.

Messages larger than SPILL_THRESHOLD are written to their file (a slot when one is ready) as
they arrive, so memory stays bounded whatever the message size.

``EMPATH_SPOOL_FAULT`` (tests only) simulates a power cut on the slot path: ``lose-link``
stores the message and acknowledges it but removes its incoming/ name and keeps its slot name,
as a power cut that lost the unflushed link would; ``torn`` writes the message with its first
data block missing (zeros), as a power cut during the write would leave it, and kills the
daemon's process group before any 250; ``reboot`` makes a process act as if the machine had
restarted since (slots.boot_tag).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from empath._speedups import StorePool, store_file, write_all
from empath.observe import metrics
from empath.spool import fileformat
from empath.spool.layout import Spool, SpoolError, syncfs
from empath.spool.records import Envelope
from empath.spool.slots import CHECK_KEY, SlotPool, data_check, release, slot_seed
from empath.spool.threads import SpoolThreads
from empath.spool.wake import Waker

log = logging.getLogger("empath.spool")

# Called in the loop when a store into a slot has finished: (seconds it took, None), or
# (0.0, the OSError that failed it).
Stored = Callable[[float, OSError | None], None]
# Called in the loop once a message committed with commit_soon is durable (None), or not
# (the SpoolError).
Committed = Callable[[SpoolError | None], None]

SPILL_THRESHOLD = 256 * 1024
# C threads of the StorePool: a store waits for a free one only when more messages than this
# are being flushed at once by one receiver (a thread that waits in fdatasync costs no CPU).
STORE_THREADS = 64
FROZEN_RECHECK = 0.1  # seconds a look at the freeze flag is trusted for
_NEW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_SLOT_FLAGS = os.O_RDWR | os.O_CLOEXEC
_FAULT = os.environ.get("EMPATH_SPOOL_FAULT", "")


class ReceiverWriter:
    """One per receiver process: the thread pool, the slots, the group commit and the waker."""

    def __init__(self, spool: Spool, threads: int = 16) -> None:
        self.spool = spool
        self._loop = asyncio.get_running_loop()
        # Paths of every message, built once: tmp/<pid>-<id> and incoming/<id> (bytes, for
        # store_file). The writer lives in one receiver process, so the pid is fixed.
        self.tmp_prefix = os.fsencode(spool.tmp_path("", os.getpid()))
        self.incoming_prefix = os.fsencode(spool.state_dir("incoming")) + b"/"
        self._dir_fd = os.open(spool.state_dir("incoming"), os.O_RDONLY | os.O_DIRECTORY)
        self._waker = Waker(spool)
        self._wake_ids: list[str] = []  # stored since the last wake-up
        # Renames into incoming/ from tmp/ are made durable by the pool's group-commit thread;
        # once a message's rename is, the worker of its share is woken (commit).
        # With spool.sync "filesystem" one syncfs per batch replaces every file's fdatasync
        # and the directory fsync (and slots would save nothing).
        self.datasync = spool.sync != "filesystem"
        self.slots = SlotPool(spool) if self.datasync else None
        self._frozen = False
        self._frozen_until = 0.0  # loop time until which _frozen is taken as true
        self._pool = SpoolThreads(self._loop, threads, sync_fd=self._dir_fd,
                                  sync=os.fsync if self.datasync else syncfs)
        # A message written into a slot: one call of the compiled store in a thread that
        # never takes the GIL, its end reported through an eventfd the loop reads.
        self._stores: StorePool | None = None
        self._storing: dict[int, tuple[Stored, IncomingMessage]] = {}
        self._tokens = 0
        if self.slots is not None:
            self._stores = StorePool(max(threads, STORE_THREADS))
            self._loop.add_reader(self._stores.fileno(), self._stored)
        # Write and commit latency histograms (no-ops when metrics are off).
        self.metrics = metrics.current()
        # Told, for each store into a slot, how late the loop settled it after the store
        # itself ended (seconds): the receiver's in-flow control (smtp/inflow.py).
        self.on_settled: Callable[[float], None] | None = None

    def begin(self, message_id: str) -> IncomingMessage:
        return IncomingMessage(self, message_id)

    def store_in_slot(self, message: IncomingMessage, done: Stored, fd: int, tmp: bytes,
                      parts: list[bytes], dest: bytes, mtime: float) -> None:
        """Store ``message`` in its slot ``tmp`` (``fd`` open on it, or -1); ``done(seconds,
        None)`` or ``done(0.0, OSError)`` is called in the loop, from the eventfd's callback,
        when the store has finished."""
        assert self._stores is not None
        self._tokens += 1
        self._storing[self._tokens] = (done, message)
        try:
            self._stores.submit(self._tokens, fd, tmp, parts, dest, tmp, mtime, True)
        except BaseException:
            del self._storing[self._tokens]
            raise

    def _stored(self) -> None:
        """The eventfd: settle every store that finished, each in turn, right here (not a
        loop turn later through a future): a message's 250 goes out as soon as it is
        durable."""
        assert self._stores is not None
        for token, err, _reused, seconds in self._stores.completed():
            done, message = self._storing.pop(token)
            failure = None
            if err == 0:
                try:  # even when nobody waits any more: the file is queued
                    message._linked()
                except Exception:  # the other stores of the batch must still be answered
                    log.exception("%s: stored, but its slot could not be released",
                                  message.id)
            else:
                failure = OSError(err, os.strerror(err), os.fsdecode(message._tmp))
            try:
                done(seconds, failure)
            except Exception:  # one session's failure must not keep the others' replies
                log.exception("%s: error after its store", message.id)

    def close(self) -> None:
        if self._stores is not None:
            self._loop.remove_reader(self._stores.fileno())
            self._stores.close()
            self._stored()
        self._pool.shutdown()
        if self.slots is not None:
            self.slots.close()
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)
        self._waker.close()

    def wake_soon(self, message_id: str) -> None:
        """Wake the delivery worker of ``message_id`` once for every message stored until
        the loop gets to it."""
        if not self._wake_ids:
            self._loop.call_soon(self._wake)
        self._wake_ids.append(message_id)

    def _wake(self) -> None:
        """Wake the delivery workers of the messages stored, unless the queue is frozen
        (``empathctl queue unfreeze`` wakes them itself): looked up at most every
        FROZEN_RECHECK seconds."""
        ids, self._wake_ids = self._wake_ids, []
        now = self._loop.time()
        if now >= self._frozen_until:
            self._frozen = self.spool.is_frozen()
            self._frozen_until = now + FROZEN_RECHECK
        if not self._frozen:
            self._waker.wake(ids=ids)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._pool.submit(fn, *args)


class IncomingMessage:
    """A message being received: buffered in memory, spilled to its file when large."""

    __slots__ = ("_writer", "id", "_chunks", "_buffered", "_size", "_fd", "_tmp", "_slot",
                 "_check", "_error", "mtime")

    def __init__(self, writer: ReceiverWriter, message_id: str) -> None:
        self._writer = writer
        self.id = message_id
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._fd = -1
        self._tmp = b""  # the file being written: a slot, or tmp/<pid>-<id>
        self._slot = False  # _tmp is a slot
        self._check = 0  # slot_check of the bytes already in a spilled slot
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
            # Read-write: a DKIM signature is computed over what was spilled (add_header).
            slots = self._writer.slots
            slot = slots.take() if slots is not None else None
            if slot is not None:
                self._tmp, self._slot = slot, True
                self._fd = os.open(slot, _SLOT_FLAGS)
                os.ftruncate(self._fd, 0)  # a recycled file's old content
                self._check = slot_seed(os.path.basename(slot))
            else:
                # A new file: recycled ones are small (at most 64 KiB), a spilled message is not.
                self._tmp = self._writer.tmp_prefix + self.id.encode()
                self._fd = os.open(self._tmp, _NEW_FLAGS, 0o600)
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._slot:
            self._check = data_check(self._check, chunks)
        write_all(self._fd, chunks)

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
            # A spilled message: rewritten in place, the header first, then the old contents.
            os.lseek(self._fd, 0, os.SEEK_SET)
            write_all(self._fd, [header, spilled])
            if self._slot:
                self._check = data_check(slot_seed(os.path.basename(self._tmp)),
                                         [header, spilled])
        else:
            self._chunks.insert(0, header)
            self._buffered += len(header)
        self._size += len(header)

    async def commit(self, envelope: Envelope) -> None:
        """Return once the message is durable (in incoming/, or complete in its slot: see the
        module docstring); SpoolError otherwise."""
        if self._error is not None:
            raise SpoolError(self._error.errno or 0, f"spool write failed: {self._error}")
        writer = self._writer
        fut: asyncio.Future[None] = writer._loop.create_future()

        def settle(error: SpoolError | None) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        if self.commit_soon(envelope, settle):
            await fut
            return
        # No slot: tmp/, rename, and a wait for the group commit's directory fsync.
        envelope["data_size"] = self._size
        started = time.monotonic()
        try:
            write_seconds = await writer._pool.submit(self._store, envelope, sync_dir=True)
        except OSError as exc:
            raise self._failed(exc) from exc
        writer.wake_soon(self.id)
        self._observe(started, write_seconds)

    def commit_soon(self, envelope: Envelope, done: Committed) -> bool:
        """commit() without a coroutine, when the message goes into a slot: the store is
        started now and ``done(None)`` (durable) or ``done(SpoolError)`` is called from the
        loop's callback that sees the store finish, so the 250 costs no extra loop turns.
        False, with nothing done, when no slot is ready (then await commit())."""
        if self._error is not None:
            return False
        slot = self._slot_for_commit()
        if slot is None and not self._slot:
            return False
        self._commit_in_slot(envelope, slot, done)
        return True

    def _slot_for_commit(self) -> bytes | None:
        """A slot for a message held in memory (None when there is none, or the message was
        spilled: it is in a slot already when self._slot)."""
        slots = self._writer.slots
        if self._fd < 0 and slots is not None:
            return slots.take()
        return None

    def _commit_in_slot(self, envelope: Envelope, slot: bytes | None,
                        done: Committed) -> None:
        """Hand the store into ``slot`` (or the slot already being written) to the StorePool;
        ``done`` is called when it has finished. A failure to hand it over is raised."""
        writer = self._writer
        envelope["data_size"] = self._size
        started = time.monotonic()

        def stored(seconds: float, failure: OSError | None) -> None:
            if failure is not None:
                done(self._failed(failure))
                return
            writer.wake_soon(self.id)
            late = self._observe(started, seconds) - seconds
            if writer.on_settled is not None:
                writer.on_settled(late)
            done(None)

        try:
            writer.store_in_slot(self, stored, *self._prepare(envelope, slot))
        except OSError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> SpoolError:
        """A failed store: nothing of it is left in the spool (as far as the disk lets us:
        a slot that cannot be removed, on a read-only spool, is one recovery discards as
        incomplete); the error to raise."""
        if self._tmp:  # the file write failed: nothing reached incoming/
            try:
                self._discard()
            except OSError as cleanup:
                log.warning("%s: not stored, and its file could not be removed: %s",
                            self.id, cleanup)
        else:  # the directory fsync failed: take the message back, it was not durable
            with contextlib.suppress(OSError):
                os.unlink(self._writer.spool.path("incoming", self.id))
        return SpoolError(exc.errno or 0, f"spool write failed: {exc}")

    def _observe(self, started: float, write_seconds: float) -> float:
        """Record the write and the whole commit; the commit's seconds. Observed here, in
        the event loop: the instruments are not thread-safe."""
        metrics_ = self._writer.metrics
        commit_seconds = time.monotonic() - started
        metrics_.spool_write.observe(write_seconds)
        metrics_.spool_commit.observe(commit_seconds)
        return commit_seconds

    def _prepare(self, envelope: Envelope, slot: bytes | None
                 ) -> tuple[int, bytes, list[bytes], bytes, float]:
        """The arguments of the store into a slot (this message's, or ``slot``): the
        descriptor (-1 when none is open), the slot, the parts with the tail, the incoming/
        path and the mtime. Sets the slot check."""
        fd, self._fd = self._fd, -1  # the store closes it in every case
        chunks, self._chunks = self._chunks, []
        if fd >= 0:
            envelope[CHECK_KEY] = data_check(self._check, chunks)
        else:
            assert slot is not None
            self._tmp, self._slot = slot, True
            envelope[CHECK_KEY] = data_check(slot_seed(os.path.basename(slot)), chunks)
        chunks.append(fileformat.encode_tail(envelope, self._size))
        if _FAULT == "torn":
            _torn(fd, self._tmp, chunks)
        return (fd, self._tmp, chunks, self._writer.incoming_prefix + self.id.encode(),
                -1.0 if self.mtime is None else self.mtime)

    def _linked(self) -> None:
        """The store into the slot is done: the message is in incoming/ (the loop thread)."""
        if self._writer.slots is not None:
            if _FAULT == "lose-link":  # as a power cut that lost the unflushed link
                os.unlink(self._writer.incoming_prefix + self.id.encode())
            else:
                self._writer.slots.linked(self._tmp)
        self._tmp = b""

    def _store(self, envelope: Envelope) -> float:
        """Thread side, for a message outside a slot: finish the file (a spilled one, a
        recycled file or a new one), fdatasync, rename it into incoming/; the seconds it
        took. One call of the compiled ``store_file``, which holds no GIL from the first
        syscall to the last."""
        writer = self._writer
        started = time.monotonic()
        fd, self._fd = self._fd, -1  # store_file closes it in every case
        chunks, self._chunks = self._chunks, []
        self._tmp = writer.tmp_prefix + self.id.encode()
        reuse = writer.spool.take_recycled() if fd < 0 else None
        chunks.append(fileformat.encode_tail(envelope, self._size))
        # fdatasync covers the data and the size; a tmp file's rename is made durable by the
        # directory fsync of the group commit. A priority mtime is a scheduling hint, not
        # state: fdatasync may not persist it, and a message that loses its place after a
        # crash is merely delivered in arrival order.
        store_file(fd, self._tmp, chunks, writer.incoming_prefix + self.id.encode(), reuse,
                   -1.0 if self.mtime is None else self.mtime, writer.datasync)
        self._tmp = b""
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
            if self._slot:
                release(self._writer.spool, self._tmp)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
            self._tmp = b""
        self._slot = False


def _torn(fd: int, path: bytes, chunks: list[bytes]) -> None:
    """EMPATH_SPOOL_FAULT=torn (tests): leave the slot as a power cut during its write can —
    the size and the tail on disk, the first data block not (zeros) — and cut the power:
    SIGKILL to the daemon's whole process group, before any 250."""
    data = b"".join(chunks)
    block = min(4096, len(data) - len(chunks[-1]))
    if fd < 0:
        fd = os.open(path, _SLOT_FLAGS)
    os.pwrite(fd, bytes(block) + data[block:], 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)
    os.killpg(os.getpgid(0), signal.SIGKILL)
