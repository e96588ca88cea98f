"""Idle SMTP connections of one delivery worker, kept for the next message to the same server.

Owns connection reuse: a healthy connection is kept per (host, ip, port, TLS policy, DANE
requirement) for ``connection_reuse.max_idle`` seconds and at most ``max_messages`` messages;
``take`` hands one back only after it answered RSET (RFC 5321 §4.1.1.5), otherwise it is
dropped. Closing (QUIT) happens in the background, and ``close`` waits for all of it at worker
shutdown. The pool never opens a connection itself and never touches the spool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from empath.delivery.connection import SMTPConnection
from empath.delivery.dane import DaneRequirement
from empath.delivery.tls import TLSPolicy

PoolKey = tuple[str, str, int, TLSPolicy, DaneRequirement | None]


class ConnectionPool:
    def __init__(self, reuse_cfg: Any) -> None:
        self.reuse = reuse_cfg
        self._idle: dict[PoolKey, list[SMTPConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def take(self, key: PoolKey) -> SMTPConnection | None:
        """An idle connection for ``key`` that answers RSET, or None."""
        pool = self._idle.get(key, [])
        while pool:
            conn = pool.pop()
            if time.monotonic() - conn.idle_since > self.reuse.max_idle:
                self.quit_later(conn)
                continue
            if await conn.reset():
                return conn
            conn.abort()
        return None

    def release(self, conn: SMTPConnection, key: PoolKey) -> None:
        """Keep a healthy connection for the next message, or close it."""
        if (self._closed or conn.broken or conn.messages >= self.reuse.max_messages
                or self.reuse.max_idle <= 0):
            self.quit_later(conn)
            return
        self._idle.setdefault(key, []).append(conn)
        asyncio.get_running_loop().call_later(self.reuse.max_idle, self._expire, key, conn)

    def _expire(self, key: PoolKey, conn: SMTPConnection) -> None:
        pool = self._idle.get(key)
        if not pool or conn not in pool:
            return  # reused (or closed) meanwhile; its own timer will come
        remaining = self.reuse.max_idle - (time.monotonic() - conn.idle_since)
        if remaining > 0:
            # Early: reused and released again since, or the loop's cached clock (uvloop
            # reads it once per iteration) started the timer before idle_since. Wait the rest.
            asyncio.get_running_loop().call_later(remaining, self._expire, key, conn)
            return
        pool.remove(conn)
        if not pool:
            del self._idle[key]
        self.quit_later(conn)

    def quit_later(self, conn: SMTPConnection) -> None:
        task = asyncio.ensure_future(conn.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle connection (at worker shutdown) and wait for the QUITs."""
        self._closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        for conn in idle:
            self.quit_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())
