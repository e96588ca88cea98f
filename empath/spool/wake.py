"""Wake-ups from receivers to delivery workers: one datagram socket per worker.

Each delivery worker binds ``control/wake/<pid>.<i>.<n>`` (AF_UNIX, SOCK_DGRAM): it is worker
``i`` of ``n`` and takes the messages of its share (``ids.shard_of``). After a group commit a
receiver sends one byte to each worker whose share holds one of the messages committed, and
only to those: a worker woken for mail it will not take would list incoming/ for nothing. A
full socket is ignored (that worker has wake-ups waiting). The list of sockets is read again
whenever ``control/wake/`` has changed (its mtime: a worker started, or one reaped, whose
socket the master removes), and a vanished or refusing socket makes the receiver read it
again at once and wake every worker if that share still has none. The datagrams carry no
data: the spool is the truth. A socket named ``<pid>`` alone is woken for every message.

A socket's path must fit ``sun_path`` (107 bytes); a spool deep in the file system would not,
so a longer one is reached through a descriptor of ``control/wake`` itself
(``/proc/self/fd/<n>/<pid>``), which the kernel resolves like any path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Collection

from empath.spool.ids import id_hash
from empath.spool.layout import Spool

_REFRESH = 2.0  # seconds between re-reads of the list of worker sockets at the latest
_REREAD_MIN = 0.1  # seconds between re-reads for a share that reached no worker
# A directory changed this recently (ns) may change again within the same tick of the clock
# that stamps it, unseen by its mtime: the list read then is read again at the next wake-up.
_RACY_NS = 50_000_000
SUN_PATH_MAX = 107  # bytes of a socket path, without its NUL
NEW_MAIL = b"!"  # a receiver committed messages to incoming/
RESCAN = b"D"  # an operator changed due times in deferred/ (retry, flush): rescan it now


class _Short:
    """Socket paths under one directory, shortened through a descriptor when too long."""

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._fd = -1

    def __call__(self, path: str) -> str:
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
        if self._fd < 0:
            self._fd = os.open(self._directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{os.path.basename(path)}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Waker:
    """Sender side (receivers, empathctl, the master)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._targets: list[tuple[str, int, int]] = []  # (address, i, n); n 0: all mail
        self._counts: set[int] = set()  # the n of the workers as last read
        self._read_at = -_REFRESH
        self._mtime: int | None = None  # control/wake/'s mtime when the list was read
        self._short = _Short(spool.wake_dir)

    def wake(self, payload: bytes = NEW_MAIL, ids: Collection[str] | None = None) -> None:
        """Wake every worker, or with ``ids`` those whose share holds one of the messages.

        A share whose worker is gone (its socket refuses or vanished: killed, restarted
        under a new pid) makes the list be read again at once, at most every _REREAD_MIN;
        if that share still has no worker, every worker is woken, and another takes the
        message once its grace is over (docs/ARCHITECTURE.md)."""
        if ids is not None and not ids:
            return
        now = time.monotonic()
        mtime = self._dir_mtime()
        if now - self._read_at > _REFRESH or mtime != self._mtime:
            self._read_targets(now, mtime)
        hashes = None if ids is None else [id_hash(i) for i in ids]
        if self._send(payload, hashes):
            return
        if now - self._read_at > _REREAD_MIN:
            self._read_targets(now, self._dir_mtime())
            if self._send(payload, hashes):
                return
        self._send(payload, None)

    def _dir_mtime(self) -> int | None:
        """control/wake/'s mtime: a worker's socket made or removed changes it, so a
        worker started (or restarted) a moment ago is woken for its first message."""
        try:
            return os.stat(self._spool.wake_dir).st_mtime_ns
        except OSError:
            return None

    def _read_targets(self, now: float, mtime: int | None) -> None:
        """Read the list of sockets; ``mtime``: control/wake/'s, taken before the listing."""
        self._targets = [(self._short(path), *(share or (0, 0)))
                         for path, share in self._spool.wake_sockets()]
        self._counts = {count for _, _, count in self._targets if count}
        self._read_at = now
        racy = mtime is None or time.time_ns() - mtime < _RACY_NS
        self._mtime = -1 if racy else mtime  # -1: never equal, read again next time

    def _send(self, payload: bytes, hashes: list[int] | None) -> bool:
        """Send to the targets (all, or those of the shares of ``hashes``); False when a
        share that was to be woken reached no worker. A target that refuses is dropped
        until the list is read again."""
        needed = set() if hashes is None else {
            (h % count, count) for count in self._counts for h in hashes}
        reached = set()
        gone: list[str] = []
        for address, index, count in self._targets:
            if hashes is not None and count and (index, count) not in needed:
                continue
            try:
                self._sock.sendto(payload, address)
            except (FileNotFoundError, ConnectionRefusedError):
                gone.append(address)
                continue
            except OSError:  # full: that worker has wake-ups waiting already
                pass
            reached.add((index, count))
        if gone:
            self._targets = [t for t in self._targets if t[0] not in gone]
        return needed <= reached

    def close(self) -> None:
        self._sock.close()
        self._short.close()


def wake_workers(spool: Spool, payload: bytes = NEW_MAIL,
                 ids: Collection[str] | None = None) -> None:
    """Wake the delivery workers once, from a process that has no Waker of its own."""
    waker = Waker(spool)
    try:
        waker.wake(payload, ids)
    finally:
        waker.close()


class WakeListener:
    """Receiver side (one per delivery worker): calls ``callback`` when woken."""

    def __init__(self, spool: Spool, callback: Callable[[], None],
                 on_rescan: Callable[[], None] | None = None,
                 share: tuple[int, int] | None = None) -> None:
        """``share``: (i, n) of a worker that takes only its share of the messages; None to
        be woken for every message."""
        self._path = spool.wake_socket_path(os.getpid(), share)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        short = _Short(spool.wake_dir)
        try:
            self._sock.bind(short(self._path))
        except BaseException:
            self._sock.close()
            raise
        finally:
            short.close()
        self._sock.setblocking(False)
        self._callback = callback
        self._on_rescan = on_rescan
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Drain everything queued: many wake-ups mean one scan.
        rescan = False
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                rescan |= self._sock.recv(64) == RESCAN
        if rescan and self._on_rescan is not None:
            self._on_rescan()
        self._callback()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
