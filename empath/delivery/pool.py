"""Idle SMTP connections of one delivery worker, kept for the next message to the same server.

Owns connection reuse: a healthy connection is kept per (host, ip, port, TLS policy, DANE
requirement) for ``connection_reuse.max_idle`` seconds and at most ``max_messages`` messages.
``take`` hands back a connection idle for less than HOT_REUSE seconds as it is (a finished
transaction leaves the server ready for the next MAIL, RFC 5321 §3.3; the connection is marked
``unverified``, and if it turns out closed before its first reply the caller delivers on a new
one: connection.StaleConnection); one idle for longer only after it answered RSET (RFC 5321
§4.1.1.5), otherwise it is dropped. Closing (QUIT) happens in the background, and ``close``
waits for all of it at worker shutdown; a delivery within ``quits_awaited`` waits for the
QUITs it started, so a connection limit it holds (delivery/limits.py ``slot``, a fleet lease)
covers its connections until they are closed, however slow the server is to answer QUIT. The
pool never opens a connection itself and never touches the spool.

Each idle connection has one timer, cancelled when the connection is taken. A timer that
fires before ``max_idle`` has passed by the clock (event-loop timers may fire a fraction of a
millisecond early) is set again for the rest, so no connection outlives ``max_idle`` by more
than the timer's own lateness, however many destinations there are. A connection the server
closed, or that received a reply nobody asked for, while idle is closed at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

from empath.config.typed import DeliveryConnectionReuseConfig
from empath.delivery.connection import SMTPConnection
from empath.delivery.dane import DaneRequirement
from empath.delivery.tls import TLSPolicy

PoolKey = tuple[str, str, int, TLSPolicy, DaneRequirement | None]

# Seconds idle below which a connection is reused without RSET: a burst of messages to one
# server costs one round trip less per message.
HOT_REUSE = 1.0

# The QUITs started by the current delivery (set by quits_awaited), or None.
_QUITS: ContextVar[set[asyncio.Task[None]] | None] = ContextVar("empath_pool_quits",
                                                                 default=None)


@asynccontextmanager
async def quits_awaited() -> AsyncIterator[None]:
    """Leave only once every QUIT started within (by this task) is over."""
    quits: set[asyncio.Task[None]] = set()
    token = _QUITS.set(quits)
    try:
        yield
    finally:
        _QUITS.reset(token)
        if quits:  # conn.quit never raises and is bounded by the quit timeout
            await asyncio.wait(quits)


class ConnectionPool:
    def __init__(self, reuse_cfg: DeliveryConnectionReuseConfig) -> None:
        self.reuse = reuse_cfg
        self._idle: dict[PoolKey, list[SMTPConnection]] = {}
        self._timers: dict[SMTPConnection, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def take(self, key: PoolKey) -> SMTPConnection | None:
        """An idle connection for ``key`` (one idle for a while must answer RSET), or None."""
        pool = self._idle.get(key, [])
        while pool:
            conn = pool.pop()
            if not pool:
                del self._idle[key]
            self._cancel_timer(conn)
            conn.reader.on_trouble = None
            if conn.broken or time.monotonic() - conn.idle_since >= self.reuse.max_idle:
                self.quit_later(conn)
                pool = self._idle.get(key, [])
                continue
            conn.unverified = (time.monotonic() - conn.idle_since < HOT_REUSE
                               and not conn.channel.pending)
            if conn.unverified:
                return conn
            if await conn.reset():
                return conn
            conn.abort()
            pool = self._idle.get(key, [])
        return None

    def release(self, conn: SMTPConnection, key: PoolKey) -> None:
        """Keep a healthy connection for the next message, or close it."""
        if (self._closed or conn.broken or conn.messages >= self.reuse.max_messages
                or self.reuse.max_idle <= 0):
            self.quit_later(conn)
            return
        self._idle.setdefault(key, []).append(conn)
        self._schedule(key, conn, self.reuse.max_idle)
        # Closed by the server, or a reply out of turn, while idle: close it now.
        conn.reader.on_trouble = lambda: self._expire(key, conn)

    def _schedule(self, key: PoolKey, conn: SMTPConnection, delay: float) -> None:
        self._cancel_timer(conn)
        self._timers[conn] = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._expire, key, conn)

    def _cancel_timer(self, conn: SMTPConnection) -> None:
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, key: PoolKey, conn: SMTPConnection) -> None:
        self._cancel_timer(conn)
        pool = self._idle.get(key)
        if not pool or conn not in pool:
            return  # taken (or closed) meanwhile
        left = self.reuse.max_idle - (time.monotonic() - conn.idle_since)
        if left > 0 and not conn.broken:
            self._schedule(key, conn, left)  # fired early: the rest of the time
            return
        pool.remove(conn)
        if not pool:
            del self._idle[key]
        conn.reader.on_trouble = None
        self.quit_later(conn)

    def quit_later(self, conn: SMTPConnection) -> None:
        task = asyncio.ensure_future(conn.quit())
        self._closing.add(task)
        waiting = _QUITS.get()
        if waiting is not None:
            waiting.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection (at worker shutdown) and wait for the QUITs."""
        self._closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for conn in idle:
            self.quit_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())
