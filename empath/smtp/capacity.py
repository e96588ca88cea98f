"""Connection counts shared by every receiver process of one daemon.

``smtp.max_connections`` and ``smtp.max_connections_per_ip`` are limits of the whole daemon, not
of one receiver: the kernel spreads connections over the receivers unevenly, so per-process
counts would refuse a client while another receiver had room. The counts live in one shared
memory file (``memfd_create``) that the master makes before it forks any receiver
(``create_shared_table``; its descriptor number is in ``$EMPATH_CONNECTION_TABLE_FD``), so
there is no file in the spool or in /dev/shm to plant, fill or keep a filesystem busy:

- the file is an array of rows, one per receiver process; a receiver opens the file anew
  (``/proc/self/fd/N``: an open file description of its own) and claims a free row with an
  open-file-description lock (``F_OFD_SETLK``) on the row's first byte; only the owner of a row
  ever writes it, so an increment needs no lock and no system call;
- a row holds the receiver's open connections and a count-min sketch of its connections per
  client address (two hash functions over ``BUCKETS`` counters each): the count for an address
  is the smaller of its two buckets' sums over all rows. A sketch never counts too few, so a
  limit is never exceeded; it counts too many only when both buckets of an address collide
  with other busy addresses, which at the sizes used here is rare (and errs on the safe side);
- a row whose lock is free belongs to a dead receiver: whoever sees that takes the lock, zeroes
  the row and lets it go, so a killed receiver's connections stop counting within one sweep
  (``refresh``, every second) without the master doing anything. Locks vanish with their
  process, so a reused pid never keeps a row alive.

Reads are plain loads of aligned 32-bit words of shared memory: a count can be a moment stale,
so two receivers accepting at the same instant may pass a limit by one. Nothing here blocks.
A receiver started without the master's table (tests, tools) counts its own connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import resource
import socket
import struct
from typing import Any

log = logging.getLogger("empath.smtp")

MAX_ROWS = 64  # receiver processes at once: processes.receivers (at most 32) twice, in a reload
BUCKETS = 16384  # counters per hash function in a row's sketch
HEADER = 2  # words before the sketch: [0] the lock byte's word, 1 while the receiver
# accepts connections (AcceptGate), [1] open connections
ROW_WORDS = HEADER + 2 * BUCKETS
ROW_BYTES = ROW_WORDS * 4


def _lock(fd: int, row: int, kind: int) -> bool:
    """Try to take (F_WRLCK) or drop (F_UNLCK) the OFD lock on ``row``'s first byte."""
    arg = struct.pack("hhqqi", kind, os.SEEK_SET, row * ROW_BYTES, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError:
        return False
    return True


TABLE_ENV = "EMPATH_CONNECTION_TABLE_FD"


def create_shared_table() -> int:
    """The master's part, once, before any receiver is forked: the shared file, its number
    exported for the children (fork keeps it open in them)."""
    fd = os.memfd_create("empath-connections", 0)
    os.ftruncate(fd, MAX_ROWS * ROW_BYTES)
    os.environ[TABLE_ENV] = str(fd)
    return fd


def _open_shared() -> int:
    """This receiver's own open file description of the master's table (OFD locks tell
    receivers apart by it), or a private table when there is none."""
    number = os.environ.get(TABLE_ENV, "")
    if number.isdigit():
        try:
            return os.open(f"/proc/self/fd/{number}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.error("cannot open the shared connection table (%s): connection limits count "
                      "this receiver's connections only", exc.strerror or exc)
    return os.memfd_create("empath-connections", os.MFD_CLOEXEC)


def buckets(ip: str) -> tuple[int, int]:
    """The address's counter in each half of a row's sketch (word offsets in the row)."""
    digest = hashlib.blake2b(ip.encode(), digest_size=8).digest()
    a, b = struct.unpack("<II", digest)
    return HEADER + a % BUCKETS, HEADER + BUCKETS + b % BUCKETS


class ConnectionTable:
    """This receiver's row in the shared table, and the sums over every live row."""

    def __init__(self) -> None:
        fd = _open_shared()
        try:
            size = MAX_ROWS * ROW_BYTES
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse: pages exist only where rows were written
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.words = memoryview(self._map).cast("I")
        self.row = self._claim()
        self.base = self.row * ROW_WORDS
        self.refresh()

    def _claim(self) -> int:
        for row in range(MAX_ROWS):
            if _lock(self._fd, row, fcntl.F_WRLCK):
                self._zero(row)
                return row
        raise OSError(f"every one of the {MAX_ROWS} rows of the connection table is in use")

    def _zero(self, row: int) -> None:
        start = row * ROW_BYTES
        self._map[start:start + ROW_BYTES] = bytes(ROW_BYTES)

    def refresh(self) -> None:
        """Zero the rows of receivers that died (counts left, lock free); every second."""
        words = self.words
        for row in range(MAX_ROWS):
            if row != self.row and (words[row * ROW_WORDS] or words[row * ROW_WORDS + 1]) \
                    and _lock(self._fd, row, fcntl.F_WRLCK):
                # A dead receiver's counts: take its row long enough to clear it.
                self._zero(row)
                _lock(self._fd, row, fcntl.F_UNLCK)

    def set_accepting(self, accepting: bool) -> None:
        """Say whether this receiver takes connections (its gate is open)."""
        self.words[self.base] = int(accepting)

    def others_accepting(self) -> bool:
        """Whether another live receiver takes connections; a dead one's row is cleared."""
        words = self.words
        for row in range(MAX_ROWS):
            if row == self.row or not words[row * ROW_WORDS]:
                continue
            if not _lock(self._fd, row, fcntl.F_WRLCK):
                return True  # its lock is held: alive
            self._zero(row)
            _lock(self._fd, row, fcntl.F_UNLCK)
        return False

    # -- this receiver's connections --------------------------------------------------------
    def opened(self, ip: str) -> tuple[int, int, int]:
        """Count a new connection; returns (daemon total, this address's count, own total)."""
        words, base = self.words, self.base
        a, b = buckets(ip)
        words[base + 1] += 1
        words[base + a] += 1
        words[base + b] += 1
        return self.total(), self.from_ip(ip, (a, b)), words[base + 1]

    def closed(self, ip: str) -> None:
        words, base = self.words, self.base
        a, b = buckets(ip)
        for offset in (1, a, b):
            if words[base + offset]:
                words[base + offset] -= 1

    # -- the daemon's -----------------------------------------------------------------------
    # Sums over every row (a strided view: one word per row); rows of no receiver are zero.
    def total(self) -> int:
        return sum(self.words[1::ROW_WORDS])

    def from_ip(self, ip: str, where: tuple[int, int] | None = None) -> int:
        a, b = where or buckets(ip)
        words = self.words
        return min(sum(words[a::ROW_WORDS]), sum(words[b::ROW_WORDS]))

    def close(self) -> None:
        """Give the row back (zeroed) and unmap; the lock goes with the descriptor."""
        if self._fd < 0:
            return
        with contextlib.suppress(ValueError, OSError):
            self._zero(self.row)
        self.words.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1


class AcceptGate:
    """This receiver's share of the listening sockets: it stops taking connections at its share
    of ``max_connections`` and takes them again below it, so the kernel hands the connections
    waiting in the shared accept queue to a receiver with room (gunicorn's
    ``worker_connections``; Postfix leaves them in the listen queue for the next free smtpd).

    Each asyncio server is given a duplicate of the master's socket: closing it stops this
    process's accepts and nobody else's, and a new duplicate starts them again.

    A receiver stops at its share only while another live receiver accepts (the table's
    ``others_accepting``): after SIGTTOU, or with the others dead, the share counted at start
    would leave clients in the accept queue with no one to take them. Two receivers reaching
    their shares at once may both stop; the next sweep (a second) opens one again.
    """

    def __init__(self, share: int, table: ConnectionTable | None = None) -> None:
        self.share = share
        self.table = table
        self.open = True
        self._specs: list[tuple[Any, Any, Any]] = []  # (socket, protocol factory, ssl context)
        self._servers: list[asyncio.AbstractServer] = []
        self._resuming: asyncio.Task[None] | None = None

    async def serve(self, sock: socket.socket, factory: Any, ssl_ctx: Any) -> None:
        self._specs.append((sock, factory, ssl_ctx))
        self._servers.append(await self._listen(sock, factory, ssl_ctx))
        self._accepting(True)

    def _accepting(self, accepting: bool) -> None:
        if self.table is not None:
            self.table.set_accepting(accepting)

    @staticmethod
    async def _listen(sock: socket.socket, factory: Any, ssl_ctx: Any) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, sock=sock.dup(), ssl=ssl_ctx, backlog=1024)

    def update(self, own: int, total: int, limit: int) -> None:
        """Called whenever this receiver's connection count changes, and every second.

        At its share a receiver stops accepting, unless the whole daemon is at ``limit``: then
        someone has to accept, to answer 421 at once rather than leave clients waiting in the
        accept queue for minutes."""
        wanted = own < self.share or total >= limit or (
            self.table is not None and not self.table.others_accepting())
        if self.open and not wanted:
            self.open = False
            self._accepting(False)
            for server in self._servers:
                server.close()
            self._servers = []
        elif not self.open and wanted and self._resuming is None:
            self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        try:
            self._servers = [await self._listen(*spec) for spec in self._specs]
            self.open = True
            self._accepting(True)
        except OSError as exc:  # the socket was closed under us (shutting down)
            log.warning("could not resume accepting connections: %s", exc)
        finally:
            self._resuming = None

    def close(self) -> None:
        self._specs.clear()
        if self._resuming is not None:
            self._resuming.cancel()
        for server in self._servers:
            server.close()
        self._servers = []
        self.open = False
        with contextlib.suppress(ValueError):  # the table may be closed already
            self._accepting(False)


def share_of(max_connections: int, receivers: int) -> int:
    """One receiver's share of the daemon's connections (rounded up: never fewer in total)."""
    return max(1, -(-max_connections // max(1, receivers)))


def raise_file_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit toward ``needed`` (and the hard one if allowed);
    returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, needed
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
