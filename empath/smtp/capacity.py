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
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import resource
import socket
import ssl
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

    def own(self) -> int:
        """This receiver's open connections."""
        return int(self.words[self.base + 1])

    def fewest_elsewhere(self) -> int | None:
        """The fewest open connections of another receiver that takes connections (None:
        no other does). Plain reads: a dead receiver's row may count until its sweep."""
        words = self.words
        fewest = None
        for start in range(0, MAX_ROWS * ROW_WORDS, ROW_WORDS):
            if start != self.base and words[start]:
                count = words[start + 1]
                if fewest is None or count < fewest:
                    fewest = count
        return fewest

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
        self._servers: list[Acceptor] = []
        self._resuming: asyncio.Task[None] | None = None
        # Connections accepted whose set-up (transport, TLS handshake, connection_made) is
        # under way: referenced until done, and waited for when the receiver stops.
        self.setting_up: set[asyncio.Task[Any]] = set()

    async def serve(self, sock: socket.socket, factory: Any, ssl_ctx: Any) -> None:
        self._specs.append((sock, factory, ssl_ctx))
        self._servers.append(await self._listen(sock, factory, ssl_ctx))
        self._accepting(True)

    def _accepting(self, accepting: bool) -> None:
        if self.table is not None:
            self.table.set_accepting(accepting)

    async def _listen(self, sock: socket.socket, factory: Any, ssl_ctx: Any) -> Acceptor:
        return Acceptor(sock, factory, ssl_ctx, self.table, self.setting_up)

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

    async def settle(self, timeout: float) -> None:
        """After close(): wait (at most ``timeout`` seconds) until every connection already
        accepted has been set up, so each is answered (a 421 while stopping) rather than
        closed unanswered when the process exits."""
        if self.setting_up:
            await asyncio.wait(list(self.setting_up), timeout=timeout)


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


ACCEPT_BATCH = 4  # connections taken per wake-up of one receiver's loop
# A receiver with more than ACCEPT_SLACK connections over another accepting receiver leaves
# new connections to it for ACCEPT_DEFER seconds, then takes a batch whatever the counts.
ACCEPT_SLACK = 2
ACCEPT_DEFER = 0.005
ACCEPT_PAUSE = 1.0  # seconds without accepting after the process ran out of descriptors
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """This receiver's accepts on one listening socket (a duplicate of the master's), a few
    per turn of the event loop.

    Every receiver watches the same accept queue. An event loop that took every waiting
    connection at once (as a server from ``loop.create_server`` does) would take a whole
    burst, say the 100 connections a client opens together, while the other receivers get
    none, and one process would then carry all of their mail. Taking ACCEPT_BATCH per turn
    leaves the rest to the other receivers' loops, which are woken too: a burst is shared
    out evenly between idle receivers, and a busy receiver (slower turns) takes fewer.

    Connections that arrive one at a time wake every receiver, and the first to run takes
    each; so a receiver with more than ACCEPT_SLACK connections over another accepting
    receiver stands back for ACCEPT_DEFER seconds (the other takes them), and then takes a
    batch whatever the counts: a stuck receiver delays new clients by that much at most."""

    def __init__(self, sock: socket.socket, factory: Any, ssl_ctx: Any,
                 table: ConnectionTable | None, setting_up: set[asyncio.Task[Any]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._table = table
        self._deferred = False
        self._sock = sock.dup()
        self._sock.setblocking(False)
        self._factory, self._ssl = factory, ssl_ctx
        self._open = True
        self._tasks = setting_up  # the gate's: tasks outlive this acceptor's close()
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        table = self._table
        if self._deferred:
            self._deferred = False  # deferred once already: this batch is taken
        elif table is not None:
            fewest = table.fewest_elsewhere()
            if fewest is not None and table.own() > fewest + ACCEPT_SLACK:
                # Another receiver with fewer connections is woken too: let it take these.
                self._deferred = True
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_DEFER, self._resume)
                return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept connections: %s; pausing for %gs",
                              exc.strerror, ACCEPT_PAUSE)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(ACCEPT_PAUSE, self._resume)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A client that fails the TLS handshake of an smtps listener, or is gone.
            log.debug("connection not set up: %s", exc)
            conn.close()
        except Exception:
            log.exception("connection not set up")
            conn.close()

    def _resume(self) -> None:
        if self._open:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Accept no more here (connections already taken go on)."""
        if self._open:
            self._open = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
