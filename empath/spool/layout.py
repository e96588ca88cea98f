"""The spool tree: every path, every state, every rename. No other module builds a spool path.

States are directories; a message is in exactly one of them, and every change of state is one
rename(2) within the one filesystem (see docs/SPOOL.md for the table of transitions):

    tmp/            being written by a receiver ("<pid>-<id>"); swept when that pid is gone
    incoming/       durable and acknowledged, not yet claimed
    active/<pid>/   claimed by the delivery worker with that pid, which holds a flock on the
                    directory for its whole life: a directory nobody has locked belongs to a
                    worker that is gone, whatever process has that pid now
    deferred/       waiting for a retry; the file's mtime is the time of the next attempt
    hold/           parked by an operator
    failed/         every recipient closed, some failed or expired, and no notice possible
                    (null sender): kept for an operator
    corrupt/        unreadable files moved aside for an operator
    recycle/        files of delivered messages, kept (about ``spool.recycle_files``, each at
                    most 64 KiB) for receivers to rename into tmp/ or slots/ and overwrite: a new
                    message then costs no inode allocation
    slots/          files whose names a receiver made durable ahead of use
                    ("<pid>-<boot>-<ulid>"); a message is written into one and linked into
                    incoming/, the slot's name removed later (empath/spool/slots.py)
    control/        ``freeze`` flag, ``wake/<pid>`` datagram sockets of delivery workers,
                    ``auth-failures/<ip>`` (times of failed AUTHs, for throttling), and
                    ``counts`` (messages per state as last listed, see counts.py),
                    ``handed-over`` ("<uid>:<gid>" of the last completed start-up hand-over
                    to ``user``: while it holds, a start does not walk the queue files,
                    empath/master/privileges.py)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from empath._speedups import list_names
from empath.spool import fileformat
from empath.spool.ids import is_valid_id, valid_ids
from empath.spool.slots import RECYCLE_MAX_SIZE, forget_recycled_after_restart, recover_slots

if TYPE_CHECKING:
    from empath.spool.writer import ReceiverWriter

log = logging.getLogger("empath.spool")

QUEUE_STATES = ("incoming", "deferred", "hold", "failed", "corrupt")
ALL_DIRS = ("tmp", "incoming", "active", "deferred", "hold", "failed", "corrupt", "recycle",
            "slots", "control", "control/wake", "control/auth-failures")
HANDED_OVER = "handed-over"  # in control/: see master/privileges.py
DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RELIST_INTERVAL = 0.05  # a receiver lists recycle/ at most this often when it found none


def open_dir_below(root_fd: int, name: str, make: bool = False, shown: str = "") -> int:
    """A descriptor of directory ``name`` ("control/wake"; "" the root itself) below
    ``root_fd``, reached one name at a time and never through a symlink. With ``make``,
    missing directories are made (0700) and one that is a link or no directory raises
    NotADirectoryError naming ``shown``; without, OSError as os.open gives it."""
    fd = os.dup(root_fd)
    try:
        for part in name.split("/") if name else []:
            below = _make_dir(fd, part, shown) if make else os.open(part, DIR_NOFOLLOW,
                                                                     dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_dir(parent: int, name: str, shown: str) -> int:
    for _ in range(2):
        try:
            return os.open(name, DIR_NOFOLLOW, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # made meanwhile: open it
                os.mkdir(name, 0o700, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise NotADirectoryError(exc.errno, "not a directory (a symlink?): remove "
                                         "it, Empath makes it again", shown) from None
            raise
    return os.open(name, DIR_NOFOLLOW, dir_fd=parent)


class SpoolError(OSError):
    """A spool operation failed; ``errno`` says why (ENOSPC → 452, anything else → 451)."""


class Spool:
    """Paths and state changes of one spool directory."""

    def __init__(self, root: str, recycle_files: int = 0, sync: str = "file") -> None:
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, "tmp")
        self.recycle = os.path.join(self.root, "recycle")
        # How many delivered messages' files this process puts in recycle/ (0: unlink them).
        self.recycle_files = recycle_files
        # How the receivers make a message durable: "file" (fdatasync each file, fsync
        # incoming/ per batch) or "filesystem" (one syncfs per batch).
        self.sync = sync
        self._recycled = 0
        # Receiver side: names listed from recycle/, taken by any writer thread.
        self._reusable: list[str] = []
        self._relist_lock = threading.Lock()
        self._relist_at = 0.0
        self._candidates_at = 0.0
        self.active = os.path.join(self.root, "active")
        self.control = os.path.join(self.root, "control")
        self.wake_dir = os.path.join(self.control, "wake")
        self.freeze_flag = os.path.join(self.control, "freeze")
        self.counts_file = os.path.join(self.control, "counts")  # see counts.py
        # The stamp of the last completed hand-over (master/privileges.py); a worker that
        # meets a queue file not its own removes it, so the next start walks the queue.
        self.handed_over = os.path.join(self.control, HANDED_OVER)
        # Delivery side: ids already reported as not this process's (logged once each).
        self._not_ours: set[str] = set()

    # -- paths ------------------------------------------------------------------------------
    def state_dir(self, state: str) -> str:
        if state not in QUEUE_STATES:
            raise ValueError(f"unknown queue state {state!r}")
        return os.path.join(self.root, state)

    def path(self, state: str, message_id: str) -> str:
        if not is_valid_id(message_id):
            raise ValueError(f"invalid queue id {message_id!r}")
        return os.path.join(self.state_dir(state), message_id)

    def active_dir(self, slot: int) -> str:
        return os.path.join(self.active, str(slot))

    def active_path(self, slot: int, message_id: str) -> str:
        return os.path.join(self.active, str(slot), message_id)

    def tmp_path(self, message_id: str, pid: int | None = None) -> str:
        return os.path.join(self.tmp, f"{os.getpid() if pid is None else pid}-{message_id}")

    def open_receiver_writer(self, threads: int = 16) -> ReceiverWriter:
        """The receiver's group-committing writer; call from inside the running event loop."""
        from empath.spool.writer import ReceiverWriter

        return ReceiverWriter(self, threads)

    # -- tree -------------------------------------------------------------------------------
    def create_tree(self) -> None:
        """Create every directory (0700); fails clearly when the spool is not writable, or
        when one of its directories is a symlink or no directory at all.

        Below the spool's own path nothing is followed: each directory is reached from the
        spool's descriptor one name at a time (O_NOFOLLOW). The spool belongs to the
        unprivileged ``user`` while a master started as root creates the tree, and that user
        could have replaced tmp/ with a link to /etc, hoping root creates, writes or removes
        files there."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        # The configured path itself may go through links an administrator made.
        root = os.open(os.path.realpath(self.root), DIR_NOFOLLOW)
        try:
            for name in ALL_DIRS:
                os.close(open_dir_below(root, name, True, os.path.join(self.root, name)))
            tmp = os.open("tmp", DIR_NOFOLLOW, dir_fd=root)
            try:
                probe = f".probe-{os.getpid()}"
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=tmp))
                os.unlink(probe, dir_fd=tmp)
            finally:
                os.close(tmp)
        finally:
            os.close(root)

    def probe_writable(self) -> None:
        """Create, write and remove a small file in tmp/ (health checks); OSError when the
        spool cannot take a new message."""
        probe = os.path.join(self.tmp, f".health-{os.getpid()}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)

    def free_bytes(self) -> int:
        """Free space of the spool's filesystem, as an unprivileged process may use it."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def list_ids(self, state: str, strays: list[str] | None = None) -> list[str]:
        """Ids in ``state``, oldest first (ids sort by arrival). Names that are no queue ids
        are appended to ``strays`` when given."""
        try:
            names = list_names(self.state_dir(state))
        except FileNotFoundError:
            return []
        ids = valid_ids(names)
        if strays is not None and len(ids) != len(names):
            strays.extend(n for n in names if not is_valid_id(n))
        ids.sort()
        return ids

    list_state = list_ids

    def list_ids_by_mtime(self, state: str, strays: list[str] | None = None) -> list[str]:
        """Ids in ``state`` in the order of their files' mtimes (then ids): the delivery order
        of incoming/ when priorities move messages (see the receiver). Names that are no
        queue ids are appended to ``strays`` when given."""
        return [name for name, _ in self.list_with_mtimes(state, strays)]

    def list_with_mtimes(self, state: str,
                         strays: list[str] | None = None) -> list[tuple[str, float]]:
        """(id, mtime) of the files in ``state``, by mtime (then id); see list_ids."""
        entries: list[tuple[float, str]] = []
        try:
            with os.scandir(self.state_dir(state)) as it:
                for entry in it:
                    if not is_valid_id(entry.name):
                        if strays is not None:
                            strays.append(entry.name)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        entries.append((entry.stat().st_mtime, entry.name))
        except FileNotFoundError:
            return []
        entries.sort()
        return [(name, mtime) for mtime, name in entries]

    def active_slots(self) -> list[int]:
        try:
            return sorted(int(n) for n in os.listdir(self.active) if n.isdigit())
        except FileNotFoundError:
            return []

    def list_active(self, slot: int | None = None) -> list[tuple[int, str]]:
        """(slot, id) of claimed messages, for one slot or all."""
        slots = [slot] if slot is not None else self.active_slots()
        out: list[tuple[int, str]] = []
        for s in slots:
            try:
                out.extend((s, n) for n in list_names(self.active_dir(s)) if is_valid_id(n))
            except FileNotFoundError:
                continue
        return sorted(out, key=lambda item: item[1])

    def find(self, message_id: str) -> tuple[str, str] | None:
        """(state, path) of a message wherever it is; state "active" for a claimed one."""
        for state in QUEUE_STATES:
            p = self.path(state, message_id)
            if os.path.exists(p):
                return state, p
        for slot, mid in self.list_active():
            if mid == message_id:
                return "active", self.active_path(slot, mid)
        return None

    # -- transitions -------------------------------------------------------------------------
    def claim(self, message_id: str, from_state: str, slot: int) -> str | None:
        """Move a message into ``active/<slot>/``; None when another process won the race,
        or when this process is not root and the file is not its own (see ``_not_owned``):
        such a file is left where it is and claimed at a later listing once it is."""
        src = self.path(from_state, message_id)
        if os.geteuid() != 0 and self._not_owned(src, from_state, message_id):
            return None
        dest = self.active_path(slot, message_id)
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            return None
        return dest

    def _not_owned(self, src: str, state: str, message_id: str) -> bool:
        """True when the queue file at ``src`` is not this process's: root put it there (a
        copy, a restore) after the last hand-over to ``user``. A worker could not read it, nor
        set its due time, and must not take it for a corrupt file; it stays in ``state``, is
        reported once, and the hand-over stamp is removed so that the next start as root
        hands the queue over again (``empathctl spool set-permissions`` does it at once)."""
        try:
            owner = os.lstat(src).st_uid
        except FileNotFoundError:
            return False  # the rename says so
        if owner == os.geteuid():
            if self._not_ours:
                self._not_ours.discard(message_id)
            return False
        if message_id not in self._not_ours:
            if len(self._not_ours) > 10000:
                self._not_ours.clear()
            self._not_ours.add(message_id)
            log.error("%s/%s is owned by uid %d, not by this process (uid %d): left there, "
                      "not delivered, until it is handed over (`empathctl spool "
                      "set-permissions` as root, or a restart of the daemon as root)", state,
                      message_id, owner, os.geteuid())
        with contextlib.suppress(OSError):
            os.unlink(self.handed_over)
        return True

    def move(self, src: str, state: str, message_id: str) -> str:
        """Rename a queue file into ``state``; returns the new path."""
        dest = self.path(state, message_id)
        os.rename(src, dest)
        return dest

    def defer(self, src: str, message_id: str, due: float) -> str:
        """Move a claimed queue file to ``deferred/``, due at ``due`` (Unix time): a deferred
        file's mtime is its due time. Not fsynced: after a crash the message is retried at
        the due time its envelope was last written with, or at once."""
        os.utime(src, (due, due))
        return self.move(src, "deferred", message_id)

    def rewrite(self, path: str, envelope: Mapping[str, Any],
                mtime: float | None = None) -> None:
        """Replace the envelope of the queue file at ``path`` atomically.

        The data is copied by the kernel into a new file beside the tmp files, the new envelope
        appended, the file fsynced (and its mtime set first, so a deferred file's due time is
        durable too), then swapped with ``path``: a crash leaves either the old or the new file.

        The swap is ``renameat2(RENAME_EXCHANGE)``, which fails when ``path`` is gone: an
        operator who deleted the message meanwhile (``empathctl queue delete --force``) is never
        undone by a rename that would bring the file back. FileNotFoundError then.
        """
        _, source = fileformat.read_unchecked(path)
        tmp = self.tmp_path(envelope["id"])
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(path, "rb") as src, open(fd, "wb") as dst:
                remaining = source.length
                while remaining > 0:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
                    if n == 0:
                        raise fileformat.CorruptFile("queue file shrank while being rewritten")
                    remaining -= n
                dst.write(fileformat.encode_tail(envelope, source.length))
                dst.flush()
                if mtime is not None:
                    os.utime(dst.fileno(), (mtime, mtime))
                # fsync, not fdatasync, when the mtime (the due time) must be durable too.
                (os.fdatasync if mtime is None else os.fsync)(dst.fileno())
                if os.fstat(src.fileno()).st_nlink == 0:
                    raise FileNotFoundError(errno.ENOENT, "deleted while being rewritten", path)
            _replace_existing(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def mark_delivered(self, path: str, recipients: int, indexes: list[int]) -> bool:
        """Record recipients ``indexes`` (of ``recipients``) of the claimed queue file at
        ``path`` delivered, in place (fileformat.mark_delivered: a few bytes overwritten and
        fdatasynced, no new space, no rename); False when the file has no done marks."""
        return fileformat.mark_delivered(path, recipients, indexes)

    def shift_due_times(self, by: float, now: float, select: Callable[[str], bool]) -> int:
        """Add ``by`` (negative: earlier) to the due times (mtimes) of the deferred files
        whose ids ``select`` picks and whose due time is after ``now`` (after a backward
        jump of the wall clock: they were set by the clock before it); how many. A due time
        never moves before ``now``."""
        moved = 0
        for message_id, mtime in self.list_with_mtimes("deferred"):
            if mtime <= now or not select(message_id):
                continue
            due = max(now, mtime + by)
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path("deferred", message_id), (due, due))
                moved += 1
        return moved

    def set_aside_stray(self, state: str, name: str) -> str | None:
        """Move ``state``/``name``, a file whose name is no queue id, to corrupt/ (under a
        free name: ``name``, else ``name.1``...); the new path, or None when it is gone or is
        not a regular file (left where it is)."""
        src = os.path.join(self.state_dir(state), os.path.basename(name))
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            return None
        if not os.path.isfile(src) or os.path.islink(src) or st.st_nlink == 0:
            return None
        corrupt = os.path.join(self.root, "corrupt")
        for n in range(1000):
            dest = os.path.join(corrupt, name if n == 0 else f"{name}.{n}")
            if os.path.lexists(dest):
                continue
            try:
                os.rename(src, dest)
            except FileNotFoundError:
                return None
            return dest
        return None

    def remove(self, path: str) -> None:
        os.unlink(path)

    # -- recycled files ----------------------------------------------------------------------
    def retire(self, path: str, size: int | None = None) -> None:
        """Take a finished message out of the queue: one rename into recycle/ (receivers
        reuse the file for new messages) when recycling is on, otherwise an unlink.
        FileNotFoundError when the file is gone.

        Either way it is one atomic step: the message is in its state or out of the queue.
        The content stays in the recycled file until a receiver overwrites it with a new
        message (and cuts it to that length): 0600, owned by the spool's user, like the
        queue itself. A file larger than RECYCLE_MAX_SIZE is renamed to ``<id>.cut`` (a name
        no receiver takes), emptied, and only then named ``<id>``: recycle/ never holds the
        space of large messages, and a large message still costs no inode allocation (which
        on ext4 after many deletions is the dearest part of a new file). Every
        ``recycle_files // 2`` retirements recycle/ is trimmed back to ``recycle_files``.
        ``size``: the message's data size when the caller knows it (the envelope's
        ``data_size``), which spares a stat.
        """
        if self.recycle_files > 0:
            big = (os.stat(path).st_size if size is None else size) > RECYCLE_MAX_SIZE
            name = os.path.basename(path)
            try:
                self.recycle_file(path, name, big)
            except FileNotFoundError:
                raise
            except OSError:  # recycle/ missing or refused: unlinking still finishes it
                pass
            else:
                self._recycled += 1
                if self._recycled >= max(self.recycle_files // 2, 1):
                    self._recycled = 0
                    self.trim_recycled()
                return
        os.unlink(path)

    def recycle_file(self, path: str, name: str, big: bool) -> None:
        """Rename ``path`` to recycle/``name``; a ``big`` file is emptied on the way, under a
        name receivers do not take (OSError from the first rename; after it, the file is out
        of ``path`` whatever happens)."""
        final = os.path.join(self.recycle, name)
        if not big:
            os.rename(path, final)
            return
        cut = final + ".cut"
        os.rename(path, cut)
        try:
            os.truncate(cut, 0)
            os.rename(cut, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(cut)

    def trim_recycled(self) -> int:
        """Unlink files beyond ``recycle_files`` from recycle/ (all of them when recycling is
        off); how many."""
        names = _listdir(self.recycle)
        # Names no receiver takes (a ``.cut`` left by a crash) always go.
        keep = valid_ids(names)[:max(self.recycle_files, 0)]
        removed = 0
        for name in set(names).difference(keep):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.recycle, name))
                removed += 1
        return removed

    def take_recycled(self) -> bytes | None:
        """The path of a file in recycle/ for a new message to reuse, or None. The caller
        claims it by renaming it into tmp/: when two receivers try one name, one wins and
        the other gets ENOENT (and creates a new file instead)."""
        while True:
            try:
                return os.fsencode(os.path.join(self.recycle, self._reusable.pop()))
            except IndexError:
                if not self._relist():
                    return None

    def recycled_candidates(self, count: int) -> list[bytes]:
        """Up to ``count`` paths of files in recycle/ for a batch of slots to claim (by
        rename: a name another receiver took first fails, and the next is tried), from a
        fresh listing each time (a list kept between batches goes stale as the other
        receivers take its files). After a listing that found none, none is made again
        before RELIST_INTERVAL."""
        now = time.monotonic()
        if self.recycle_files <= 0 or now < self._candidates_at:
            return []
        names = valid_ids(_listdir(self.recycle))
        if not names:
            self._candidates_at = now + RELIST_INTERVAL
            return []
        prefix = os.fsencode(self.recycle) + b"/"
        return [prefix + os.fsencode(n) for n in random.sample(names, min(count, len(names)))]

    def _relist(self) -> bool:
        """Refill the names to reuse from recycle/; whether there are any. After a listing
        that found none, not again before RELIST_INTERVAL. Shuffled so that receivers do not
        all race for the same name."""
        if self.recycle_files <= 0:
            return False
        with self._relist_lock:
            if self._reusable:
                return True
            now = time.monotonic()
            if now < self._relist_at:
                return False
            names = valid_ids(_listdir(self.recycle))
            if not names:
                self._relist_at = now + RELIST_INTERVAL
            random.shuffle(names)
            self._reusable.extend(names)
            return bool(names)

    def sync_dir(self, state: str) -> None:
        """fsync a state directory, making the renames into it durable."""
        fd = os.open(self.state_dir(state), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark_corrupt(self, path: str, message_id: str, reason: str) -> None:
        """Move an unreadable file to corrupt/ (never delete it) and say so in the log."""
        name = message_id if is_valid_id(message_id) else os.path.basename(path)
        dest = os.path.join(self.root, "corrupt", name)
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return
        log.error("%s: moved to corrupt/: %s", name, reason)

    # -- recovery ----------------------------------------------------------------------------
    def lock_active(self, slot: int) -> int:
        """Create ``active/<slot>/`` and take its ownership lock (flock on the directory);
        the descriptor to keep open while claiming into it. A directory removed by a recovery
        between creation and locking is made again (bounded)."""
        path = self.active_dir(slot)
        for _ in range(5):
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # recovered and removed meanwhile: make it again
        raise SpoolError(errno.EAGAIN, "active directory keeps disappearing", path)

    def recover_unowned(self, slot: int) -> int:
        """Requeue ``active/<slot>/`` if no live worker owns it (its lock is free); how many
        messages were moved. The lock is held while moving, so a worker can never be claiming
        into the directory meanwhile. OSError (EROFS, ENOSPC, EIO...) when a move fails:
        the rest stays claimed for a later try."""
        path = self.active_dir(slot)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live worker owns it
            return self.recover_active(slot)
        finally:
            os.close(fd)

    def recover_active(self, slot: int) -> int:
        """Return a dead worker's claimed messages to incoming/; how many were moved."""
        d = self.active_dir(slot)
        moved = 0
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return 0
        try:
            for name in names:
                if is_valid_id(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(os.path.join(d, name), self.path("incoming", name))
                        moved += 1
        finally:
            if moved:
                log.warning("requeued %d message(s) claimed by delivery worker %d", moved,
                            slot)
        with contextlib.suppress(OSError):
            os.rmdir(d)
        return moved

    def sweep_tmp(self, dead: Callable[[int], bool]) -> int:
        """Unlink the tmp/ files of writers that are gone (``dead(pid)`` is true); how many.

        A tmp/ file is named ``<writer pid>-<id>`` and only its writer ever renames it, so
        once that process is gone the file is a half-written message nobody acknowledged
        (or an envelope rewrite that never replaced its original). The slots of such a writer
        are recovered too: a complete message in one goes into incoming/ (see slots.py)."""
        recover_slots(self, dead)
        removed = 0
        for name in _listdir(self.tmp):
            pid_text, _, _ = name.partition("-")
            if not pid_text.isdigit() or not dead(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.tmp, name))
                removed += 1
        return removed

    def recover_all(self, alive: Callable[[int], bool]) -> int:
        """At start-up: requeue active/ of workers that are gone (by their locks, not by pid:
        a pid may have been reused), sweep tmp/ files of dead writers (and their slots: see
        slots.py); after a restart of the machine, empty recycle/."""
        forget_recycled_after_restart(self)
        moved = sum(self.recover_unowned(s) for s in self.active_slots())
        self.sweep_tmp(lambda pid: not alive(pid))
        self.trim_recycled()  # recycle_files may have been lowered (or set to 0)
        for name in _listdir(self.tmp):  # probes and strays of processes that are gone
            if not name.partition("-")[0].isdigit():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.tmp, name))
        for name in _listdir(self.wake_dir):
            pid = name.partition(".")[0]
            if pid.isdigit() and not alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.wake_dir, name))
        return moved

    # -- control -----------------------------------------------------------------------------
    def is_frozen(self) -> bool:
        return os.path.exists(self.freeze_flag)

    def set_frozen(self, frozen: bool) -> None:
        if frozen:
            fd = os.open(self.freeze_flag, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.freeze_flag)

    def auth_failures_path(self, ip: str) -> str:
        """The file of one client address's failed AUTH times, shared by all receivers."""
        if not ip or any(c not in "0123456789abcdefABCDEF.:" for c in ip):
            raise ValueError(f"not an IP address: {ip!r}")
        return os.path.join(self.control, "auth-failures", ip)

    def wake_socket_path(self, pid: int, share: tuple[int, int] | None = None) -> str:
        """control/wake/<pid>, or <pid>.<i>.<n> for worker ``i`` of ``n`` (``share``), which
        receivers wake only for messages of its share (``ids.shard_of``)."""
        name = str(pid) if share is None else f"{pid}.{share[0]}.{share[1]}"
        return os.path.join(self.wake_dir, name)

    def wake_sockets(self) -> Iterator[tuple[str, tuple[int, int] | None]]:
        """(path, share or None) of every worker's wake socket."""
        for name in _listdir(self.wake_dir):
            pid, _, rest = name.partition(".")
            if not pid.isdigit():
                continue
            if not rest:
                yield os.path.join(self.wake_dir, name), None
                continue
            index, _, count = rest.partition(".")
            if index.isdigit() and count.isdigit() and int(index) < int(count):
                yield os.path.join(self.wake_dir, name), (int(index), int(count))

    def remove_wake_sockets(self, pid: int) -> None:
        """Remove the wake socket of worker ``pid``, reaped: receivers stop sending to it
        and read the list of sockets again (a killed worker leaves its socket behind)."""
        for path, _ in self.wake_sockets():
            if os.path.basename(path).partition(".")[0] == str(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def syncfs(fd: int) -> None:
    """syncfs(2): write back and flush everything of the filesystem holding ``fd``; OSError
    on failure (Linux 5.8+ reports writeback errors of any file of that filesystem)."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available here")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _replace_existing(new: str, path: str) -> None:
    """Put ``new`` in the place of ``path`` only if ``path`` still exists; ``new`` is gone
    afterwards either way (on success it holds the old file, which is unlinked)."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(path),
                        _RENAME_EXCHANGE)
        if rc == 0:
            os.unlink(new)
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: not supported here
            raise OSError(err, os.strerror(err), path)
    # Without RENAME_EXCHANGE the fstat check in rewrite() already narrowed the window.
    os.rename(new, path)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listdir(path: str) -> list[str]:
    try:
        return list_names(path)
    except FileNotFoundError:
        return []


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
