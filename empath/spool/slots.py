"""Slots: files whose names are made durable before a message is written into them.

A receiver's 250 must follow the flushes that make the message's bytes *and* its name durable.
Renaming a finished file into incoming/ and then fsyncing incoming/ costs two flushes in a row
per batch. A slot removes the second one from the path of the 250: ``slots/<pid>-<ulid>`` is
created (or a file of recycle/ is renamed to that name) by the receiver's slot thread ahead of
use, a batch at a time, and one ``fsync(slots/)`` makes the whole batch's names durable before
any of them is handed out. A message is then written into a slot in place, fdatasynced (the
one flush its 250 waits for) and renamed into incoming/. That rename is not flushed before the
250: if power fails before it reaches the disk, the message is still in its slot, complete.

So after a crash a slot holds either a complete message or something that is not one (empty,
half written, a recycled file's old message, a mixture of both). A message written into a slot
carries ``slot_check`` in its envelope: the CRC-32 of its data, seeded with the CRC-32 of the
slot's name. The trailer proves the lengths; ``slot_check`` proves that every data block is the
one written for this slot (a block the power cut kept from the disk reads back as zeros or old
bytes), and the seed proves that the content was written for this name, not left by a recycled
file's previous message. Only :func:`recover_slots` (at start-up, and when the master reaps a
receiver) reads slots: a complete one is moved into incoming/, anything else is recycled.
Delivery and ``empathctl`` never look into slots/.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from empath.spool import fileformat
from empath.spool.ids import is_valid_id, new_message_id

if TYPE_CHECKING:
    from empath.spool.layout import Spool

RECYCLE_MAX_SIZE = 64 * 1024  # larger files are unlinked: recycle/ would hold their space

log = logging.getLogger("empath.spool")

SLOTS_DIR = "slots"
CHECK_KEY = "slot_check"
_READ = 1 << 20


def slot_seed(name: bytes | str) -> int:
    """The CRC-32 a slot's check starts from: that of its file name."""
    return zlib.crc32(os.fsencode(name))


def data_check(seed: int, parts: list[bytes]) -> int:
    """CRC-32 of ``parts`` in order, continuing from ``seed``."""
    crc = seed
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


class SlotPool:
    """One receiver's slots: a thread keeps between ``low`` and ``high`` of them ready, made a
    batch at a time and made durable by one ``fsync(slots/)`` per batch. ``take`` never blocks
    and returns None when none is ready (the writer then uses tmp/ and the group commit)."""

    def __init__(self, spool: Spool, low: int = 128, high: int = 256, batch: int = 64) -> None:
        self.spool = spool
        self.dir = os.path.join(spool.root, SLOTS_DIR)
        self.prefix = os.fsencode(self.dir) + b"/%d-" % os.getpid()
        self.low, self.high, self.batch = low, high, batch
        self._ready: collections.deque[bytes] = collections.deque()
        self._want = threading.Event()
        self._closed = False
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._want.set()
        self._thread = threading.Thread(target=self._run, name="spool-slots", daemon=True)
        self._thread.start()

    def take(self) -> bytes | None:
        """The path of a ready slot (taken: nobody else gets it), or None."""
        try:
            slot = self._ready.popleft()
        except IndexError:
            slot = None
        if len(self._ready) < self.low:
            self._want.set()
        return slot

    def ready(self) -> int:
        return len(self._ready)

    def _run(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            while not self._closed and len(self._ready) < self.high:
                try:
                    made = self._make(min(self.batch, self.high - len(self._ready)))
                except OSError as exc:
                    log.error("cannot prepare spool slots: %s", exc)
                    break
                self._ready.extend(made)
            if self._closed:
                return

    def _make(self, count: int) -> list[bytes]:
        """``count`` new slots, their names durable when this returns."""
        made: list[bytes] = []
        try:
            for _ in range(count):
                path = self.prefix + new_message_id().encode()
                reuse = self.spool.take_recycled()
                if reuse is not None:
                    try:
                        os.rename(reuse, path)
                    except OSError:  # another receiver took it first
                        reuse = None
                if reuse is None:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                     0o600))
                made.append(path)
            os.fsync(self._dir_fd)
        except OSError:
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return made

    def close(self) -> None:
        """Stop the thread; ready slots go back to recycle/ (or are removed)."""
        self._closed = True
        self._want.set()
        self._thread.join()
        if self._ready:
            while self._ready:
                release(self.spool, self._ready.popleft())
            self.spool.trim_recycled()
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)


def release(spool: Spool, path: bytes | str) -> None:
    """Give up a slot that holds no message: into recycle/ (under its id) when it is small
    enough to be recycled, else removed (recycle/ would hold its blocks)."""
    path = os.fsdecode(path)
    ulid = os.path.basename(path).partition("-")[2]
    try:
        small = os.stat(path).st_size <= RECYCLE_MAX_SIZE
    except FileNotFoundError:
        return
    if spool.recycle_files > 0 and small and is_valid_id(ulid):
        try:
            os.rename(path, os.path.join(spool.recycle, ulid))
            return
        except OSError:
            pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def check_slot(path: str) -> dict[str, Any] | None:
    """The envelope of the complete message in the slot at ``path``, or None when it holds
    none (its trailer, envelope or ``slot_check`` does not match)."""
    try:
        envelope, source = fileformat.read_queue_file(path)
    except (fileformat.CorruptFile, OSError):
        return None
    expected = envelope.get(CHECK_KEY)
    if not isinstance(expected, int) or not is_valid_id(str(envelope.get("id"))):
        return None
    crc = slot_seed(os.path.basename(path))
    try:
        with open(path, "rb") as fh:
            remaining = source.length
            while remaining > 0:
                block = fh.read(min(_READ, remaining))
                if not block:
                    return None
                crc = zlib.crc32(block, crc)
                remaining -= len(block)
    except OSError:
        return None
    return envelope if crc == expected else None


def recover_slots(spool: Spool, dead: Callable[[int], bool]) -> int:
    """For every slot of a writer that is gone (``dead(pid)``): a complete message goes into
    incoming/ (it may have been acknowledged: its rename into incoming/ was lost or never
    made), anything else back to recycle/. Returns how many messages were moved."""
    moved = 0
    try:
        names = os.listdir(os.path.join(spool.root, SLOTS_DIR))
    except FileNotFoundError:
        return 0
    for name in names:
        pid_text, _, _ = name.partition("-")
        if not pid_text.isdigit() or not dead(int(pid_text)):
            continue
        path = os.path.join(spool.root, SLOTS_DIR, name)
        envelope = check_slot(path)
        if envelope is None:
            release(spool, path)
            continue
        message_id = str(envelope["id"])
        if spool.find(message_id) is not None:  # already in the queue: this copy is stale
            release(spool, path)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, spool.path("incoming", message_id))
            moved += 1
            log.warning("%s: recovered from its slot into incoming/", message_id)
    if moved:
        spool.sync_dir("incoming")
    return moved
