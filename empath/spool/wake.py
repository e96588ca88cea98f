"""Wake-ups from receivers to delivery workers: one datagram socket per worker.

Each delivery worker binds ``control/wake/<pid>`` (AF_UNIX, SOCK_DGRAM). After a group commit a
receiver sends one byte to every worker; a full or vanished socket is ignored, because the
workers also scan the spool on a timer. The datagrams carry no data: the spool is the truth.

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
from collections.abc import Callable

from empath.spool.layout import Spool

_REFRESH = 2.0  # seconds between re-reads of the list of worker sockets
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
    """Sender side (receivers, empathctl)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._targets: list[str] = []
        self._read_at = 0.0
        self._short = _Short(spool.wake_dir)

    def wake(self, payload: bytes = NEW_MAIL) -> None:
        now = time.monotonic()
        if now - self._read_at > _REFRESH:
            self._targets = [self._short(p) for p in self._spool.wake_socket_paths()]
            self._read_at = now
        for path in self._targets:
            with contextlib.suppress(OSError):
                self._sock.sendto(payload, path)

    def close(self) -> None:
        self._sock.close()
        self._short.close()


class WakeListener:
    """Receiver side (one per delivery worker): calls ``callback`` when woken."""

    def __init__(self, spool: Spool, callback: Callable[[], None],
                 on_rescan: Callable[[], None] | None = None) -> None:
        self._path = spool.wake_socket_path(os.getpid())
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
