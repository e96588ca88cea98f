"""Slots: files whose names are made durable before a message is written into them.

A receiver's 250 must follow the flushes that make the message's bytes *and* a name for it
durable. Renaming a finished file into incoming/ and then fsyncing incoming/ costs two flushes in
a row. A slot takes the second one off the path of the 250: ``slots/<pid>-<boot>-<ulid>`` is
created (or a file of recycle/ is renamed to that name) by the receiver's slot thread ahead of
use, a batch at a time, and one ``fsync(slots/)`` makes the whole batch's names durable before
any of them is handed out. A message is then written into a slot in place, fdatasynced (the one
flush its 250 waits for) and *linked* into incoming/: the slot keeps its name, so whatever a
power cut does to the unflushed link, the message keeps a durable name. The slot thread removes
the slot names of linked messages in batches, each batch only after an ``fsync(incoming/)`` that
began after their links (the group commit, off the path of any 250).

So a slot name holds, at any instant, an unused file, a message being written, or a message
whose incoming/ name may not be durable yet. Which of these matters only after a power cut:

- while the machine stays up (a receiver or the whole daemon killed), the kernel's view is the
  truth: a message whose store returned is linked into incoming/, one whose store did not was
  never acknowledged. A slot is then never a message: it is removed (or recycled).
- after a restart of the machine (``<boot>``, from the kernel's boot id, differs), a slot whose
  file has no other name and holds a complete message is one whose link the power cut lost:
  it is linked into incoming/ again. "Complete" is proven by ``slot_check`` in its envelope: the
  CRC-32 of its data, seeded with the CRC-32 of the slot's name. The trailer proves the lengths;
  the check proves every data block (one the cut kept from the disk reads as zeros or as old
  bytes), and the seed proves the content was written for this slot, not left by a recycled
  file's previous message.

Only :func:`recover_slots` (at start-up, and when the master reaps a receiver) reads slots;
delivery and ``empathctl`` never look into slots/.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from empath._speedups import make_slots, sync_and_unlink
from empath.spool import fileformat
from empath.spool.ids import is_valid_id, new_message_id

if TYPE_CHECKING:
    from empath.spool.layout import Spool

RECYCLE_MAX_SIZE = 64 * 1024  # larger files are emptied before they are recycled
# Slots a receiver keeps ready to start with: refilled below SLOTS_LOW, up to SLOTS_HIGH,
# SLOTS_BATCH names per fsync(slots/). A message that finds none ready takes the slower path
# (tmp/, rename, a directory fsync), and each time that happens the pool doubles, up to
# SLOTS_MAX ready (about half a second of one receiver's peak rate): at 100 sessions end to
# end 128-256 ready slots ran out in bursts, for up to a sixth of the messages, while an
# idle daemon needs no more than the first few.
SLOTS_LOW, SLOTS_HIGH, SLOTS_BATCH = 128, 256, 64
SLOTS_MAX = 1024
# The names of linked slots are removed after an fsync(incoming/) at most this often (or once
# this many wait): that fsync commits the filesystem's journal, and a store's fdatasync that
# runs into it waits for the commit; every 50 ms, it made one message in forty slow.
UNLINK_INTERVAL, UNLINK_BATCH = 0.25, 1024

log = logging.getLogger("empath.spool")

SLOTS_DIR = "slots"
CHECK_KEY: Final = "slot_check"
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


def boot_tag() -> str:
    """This boot of the machine: the start of the kernel's boot id. ``EMPATH_SPOOL_FAULT=reboot``
    (tests) makes the process act as if the machine had restarted since the spool was used."""
    global _BOOT
    if _BOOT is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                _BOOT = fh.read().strip().replace("-", "")[:12] or "unknown"
        except OSError:
            _BOOT = "unknown"  # never equal to a slot's: slots are treated as after a restart
        if os.environ.get("EMPATH_SPOOL_FAULT") == "reboot":
            _BOOT = "%012x" % (int(_BOOT, 16) ^ 1) if _BOOT != "unknown" else "rebooted"
    return _BOOT


_BOOT: str | None = None


class SlotPool:
    """One receiver's slots: a thread keeps between ``low`` and ``high`` of them ready, made a
    batch at a time and made durable by one ``fsync(slots/)`` per batch, and removes the names
    of linked slots after an ``fsync(incoming/)``. ``take`` never blocks and returns None when
    none is ready (the writer then uses tmp/ and the group commit)."""

    def __init__(self, spool: Spool, low: int = SLOTS_LOW, high: int = SLOTS_HIGH,
                 batch: int = SLOTS_BATCH, interval: float = 0.05) -> None:
        self.spool = spool
        self.dir = os.path.join(spool.root, SLOTS_DIR)
        self.prefix = os.fsencode(self.dir) + b"/%d-%s-" % (os.getpid(), boot_tag().encode())
        self.low, self.high, self.batch, self.interval = low, high, batch, interval
        self._ready: collections.deque[bytes] = collections.deque()
        self._linked: collections.deque[bytes] = collections.deque()
        self._want = threading.Event()
        self._closed = False
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._incoming_fd = os.open(spool.state_dir("incoming"),
                                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._unlinked_at = 0.0
        self._want.set()
        self._thread = threading.Thread(target=self._run, name="spool-slots", daemon=True)
        self._thread.start()

    def take(self) -> bytes | None:
        """The path of a ready slot (taken: nobody else gets it), or None (then the pool
        grows)."""
        try:
            slot = self._ready.popleft()
        except IndexError:
            slot = None
            self._grow()
        if len(self._ready) < self.low:
            self._want.set()
        return slot

    def _grow(self) -> None:
        """None was ready: keep twice as many, up to SLOTS_MAX (read by the slot thread at
        its next batch; plain assignments)."""
        if self.high < SLOTS_MAX:
            self.high = min(2 * self.high, SLOTS_MAX)
            self.low = self.high // 2
            self.batch = max(self.batch, self.high // 4)

    def linked(self, slot: bytes) -> None:
        """The message in ``slot`` is linked into incoming/: remove the slot's name once
        incoming/ is flushed (any thread)."""
        self._linked.append(slot)

    def ready(self) -> int:
        return len(self._ready)

    def _run(self) -> None:
        while True:
            self._want.wait(self.interval)
            self._want.clear()
            # Slots first: 250s wait for them, while the names of linked slots can wait
            # (their fsync of incoming/ may take long on a busy disk).
            if len(self._ready) < self.low:
                self._refill()
            now = time.monotonic()
            if now - self._unlinked_at >= UNLINK_INTERVAL or len(self._linked) >= UNLINK_BATCH:
                self._unlinked_at = now
                self._unlink_linked()
            if len(self._ready) < self.low:  # not a top-up at every wake: each batch's
                self._refill()                # fsync(slots/) commits the journal too
            if self._closed:
                self._unlink_linked()
                return

    def _refill(self) -> None:
        while not self._closed and len(self._ready) < self.high:
            try:
                made = self._make(min(self.batch, self.high - len(self._ready)))
            except OSError as exc:
                log.error("cannot prepare spool slots: %s", exc)
                return
            self._ready.extend(made)

    def _unlink_linked(self) -> None:
        """fsync incoming/, then remove the slot names of the messages linked before it: one
        compiled call without the GIL (the receiver's event loop keeps it)."""
        count = len(self._linked)
        if not count:
            return
        names = [self._linked.popleft() for _ in range(count)]
        try:
            sync_and_unlink(self._incoming_fd, names)
        except OSError as exc:  # the names stay: a message keeps its durable one
            log.error("fsync of incoming/ failed, slot names kept: %s", exc)
            self._linked.extendleft(reversed(names))

    def _make(self, count: int) -> list[bytes]:
        """``count`` new slots (files of recycle/ where there are some), their names durable
        when this returns: one compiled call without the GIL."""
        made = [self.prefix + new_message_id().encode() for _ in range(count)]
        # Twice as many candidates as slots: another receiver may have taken some first.
        sources = self.spool.recycled_candidates(2 * count)
        try:
            make_slots(self._dir_fd, made, sources)
        except OSError:
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        return made

    def close(self) -> None:
        """Stop the thread (after it removed the names of linked slots); ready slots go back to
        recycle/ (or are removed)."""
        self._closed = True
        self._want.set()
        self._thread.join()
        if self._ready:
            while self._ready:
                release(self.spool, self._ready.popleft())
            self.spool.trim_recycled()
        for fd in (self._dir_fd, self._incoming_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def release(spool: Spool, path: bytes | str) -> None:
    """Give up a slot that holds no message: into recycle/ (under its id, emptied first when
    larger than RECYCLE_MAX_SIZE) when it has no other name, else removed."""
    path = os.fsdecode(path)
    ulid = os.path.basename(path).rpartition("-")[2]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if spool.recycle_files > 0 and st.st_nlink == 1 and is_valid_id(ulid):
        try:
            spool.recycle_file(path, ulid, st.st_size > RECYCLE_MAX_SIZE)
            return
        except OSError:
            pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def check_slot(path: str) -> dict[str, Any] | None:
    """The envelope of the complete message in the slot at ``path``, or None when it holds
    none (its trailer, envelope or ``slot_check`` does not match)."""
    try:
        envelope, source = fileformat.read_unchecked(path)
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
    """Deal with the slots of writers that are gone; returns how many messages were put
    back into incoming/.

    A slot of this boot whose writer is dead (``dead(pid)``) holds no message that is not
    also in the queue: it is recycled, or only removed when the file has another name. A slot
    of an earlier boot (whatever its pid) is what a power cut left: holding a complete message
    written for it (see check_slot) that is not in the queue, it is linked into incoming/,
    incoming/ is flushed, and only then is the slot's name removed; anything else is removed.
    Its link count decides nothing: a file can be both a slot whose name was not yet removed
    and, recycled, the next slot holding a new message; and after a cut the count on disk may
    be wrong. For the same reason nothing of an earlier boot is recycled."""
    slots = os.path.join(spool.root, SLOTS_DIR)
    try:
        names = os.listdir(slots)
    except FileNotFoundError:
        return 0
    boot = boot_tag()
    moved: list[str] = []
    for name in names:
        pid_text, _, rest = name.partition("-")
        slot_boot = rest.partition("-")[0]
        path = os.path.join(slots, name)
        if slot_boot == boot:
            if pid_text.isdigit() and dead(int(pid_text)):
                release(spool, path)
            continue
        envelope = check_slot(path)
        if envelope is None or spool.find(str(envelope["id"])) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        message_id = str(envelope["id"])
        try:
            os.link(path, spool.path("incoming", message_id))
        except OSError as exc:
            log.error("%s: cannot recover it from its slot %s: %s", message_id, name, exc)
            continue
        moved.append(path)
        log.warning("%s: recovered from its slot into incoming/ (acknowledged before a restart "
                    "of the machine)", message_id)
    if moved:
        spool.sync_dir("incoming")
        for path in moved:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return len(moved)


def forget_recycled_after_restart(spool: Spool) -> bool:
    """At start-up: when the machine restarted since the spool was last used, empty recycle/
    (after a power cut a recycled file may share its inode with a queued message, and reusing
    it would overwrite that message). Records this boot in ``control/boot``; whether it
    emptied recycle/."""
    record = os.path.join(spool.control, "boot")
    try:
        with open(record) as fh:
            last = fh.read().strip()
    except FileNotFoundError:
        last = ""
    boot = boot_tag()
    if last == boot:
        return False
    for name in os.listdir(spool.recycle) if os.path.isdir(spool.recycle) else []:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(spool.recycle, name))
    tmp = record + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as fh:
        fh.write(boot + "\n")
    os.replace(tmp, record)
    return True
