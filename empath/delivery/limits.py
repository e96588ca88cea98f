"""Per-destination limits of remote delivery, held for the whole daemon across its workers.

Owns the two limits a destination domain gets (``max_connections`` simultaneous deliveries and
``rate_limit`` messages per minute; the domain's own settings, else the defaults) and how they
are divided among the M delivery worker processes. Workers share nothing but the spool, so the
division is static: worker ``index`` (1-based) of ``count`` takes its *share*:

- ``max_connections`` L: ``L // M`` each, and the ``L % M`` left over go one each to the
  workers a hash of the domain picks (``crc32``, the same in every process), so the shares add
  up to exactly L and the spare slots of many domains are spread over the workers. A limit
  smaller than the number of workers cannot be split without leaving some workers at 0, and a
  worker at 0 could never deliver the mail it claims (a deferred message goes back to the
  worker that owns its id: it would wait until it expired). So every share is at least 1: the
  limit holds exactly for L >= M, and for L < M the daemon may open M connections (the start-up
  log says which domains are affected).
- ``rate_limit`` R: a token bucket per worker refilled at R / M messages per minute, holding at
  most max(1, R / M) tokens, so the workers together send at most R a minute in the long run
  and at most max(R, M) at once from full buckets.

A worker's share is fixed: mail for one domain that happens to sit with one worker moves at that
worker's share only. Waiting for a token is counted in ``empath_rate_limit_waits_total``.

Within one worker the connection limit is an ``asyncio.Semaphore`` per domain, dropped once no
delivery uses it; rate limiters are kept while they matter (see ``forget``). Never opens a
connection and never touches the spool.

Waiting is visible to the worker: a message's delivery task carries a ``Ticket`` (``track``),
and ``slot`` and ``pace`` count on it the destination deliveries that wait for a connection slot
or a rate token. A message whose running destination deliveries all wait holds no delivery slot
(``delivery.max_parallel_deliveries``): the worker takes other mail meanwhile, so a destination
at its limit never delays another destination's mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any

from empath.observe import metrics

RATE_LIMITERS_KEPT = 1000  # beyond this many, limiters with a full bucket are dropped


class Ticket:
    """One message's destination deliveries in a worker: how many run (``running``) and how
    many of those wait for a destination's connection slot or rate token (``waiting``).
    ``on_change`` is called whenever ``blocked`` may have changed."""

    __slots__ = ("on_change", "running", "waiting")

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.running = 0
        self.waiting = 0
        self.on_change = on_change

    @property
    def blocked(self) -> bool:
        """Every running destination delivery of the message waits for a destination."""
        return self.running > 0 and self.waiting >= self.running

    def run(self) -> contextlib.AbstractContextManager[None]:
        """Count one destination delivery as running while the block runs."""
        return self._counting("running")

    def wait(self) -> contextlib.AbstractContextManager[None]:
        """Count one destination delivery as waiting while the block runs."""
        return self._counting("waiting")

    @contextmanager
    def _counting(self, field: str) -> Iterator[None]:
        setattr(self, field, getattr(self, field) + 1)
        self.on_change()
        try:
            yield
        finally:
            setattr(self, field, getattr(self, field) - 1)
            self.on_change()


_TICKET: ContextVar[Ticket | None] = ContextVar("empath_delivery_ticket", default=None)


def track(ticket: Ticket | None) -> None:
    """Make ``ticket`` the current task's ticket (tasks it starts inherit it)."""
    _TICKET.set(ticket)


def current_ticket() -> Ticket:
    """The current task's ticket, or a fresh one nobody looks at."""
    return _TICKET.get() or Ticket()


@contextmanager
def _waiting() -> Iterator[None]:
    ticket = _TICKET.get()
    if ticket is None:
        yield
        return
    with ticket.wait():
        yield


def share_of(total: int, index: int, count: int, key: str = "") -> int:
    """Worker ``index`` of ``count``'s part of ``total``: the parts of all workers add up to
    ``total`` when ``total >= count``; never less than 1 (see the module docstring)."""
    if count <= 1:
        return total
    base, extra = divmod(total, count)
    position = (index - 1 - zlib.crc32(key.encode())) % count
    return max(1, base + (1 if position < extra else 0))


class RateLimiter:
    """A token bucket: ``per_minute`` messages a minute, at most ``capacity`` at once."""

    def __init__(self, per_minute: float, capacity: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, float(per_minute if capacity is None else capacity))
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def ready(self) -> bool:
        """Whether a token can be taken without waiting."""
        self._refill()
        return self.tokens >= 1.0

    def is_full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity

    async def acquire(self) -> bool:
        """Take one token, waiting for it; whether it had to wait."""
        waited = False
        while True:
            self._refill()
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return waited
            waited = True
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class DestinationLimits:
    """This worker's share of every destination's connection and rate limits."""

    def __init__(self, delivery_cfg: Any, share: tuple[int, int] = (1, 1)) -> None:
        self.delivery = delivery_cfg
        self.index, self.count = share
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # deliveries in progress per domain
        self._rates: dict[str, RateLimiter] = {}

    def configured(self, domain: str) -> tuple[int, int | None]:
        """The daemon-wide ``(max_connections, rate_limit)`` of ``domain``."""
        own = (self.delivery.domains or {}).get(domain)
        limit = (own.max_connections if own is not None and own.max_connections
                 else self.delivery.max_connections)
        rate = own.rate_limit if own is not None and own.rate_limit else None
        return limit, rate or self.delivery.rate_limits.default

    def connections(self, domain: str) -> int:
        """This worker's share of the domain's ``max_connections``."""
        return share_of(self.configured(domain)[0], self.index, self.count, domain)

    def undivided(self) -> list[str]:
        """Domains (``*`` for the default) whose connection limit is below the worker count,
        where the workers together may open more connections than configured."""
        if self.count <= 1:
            return []
        out = ["*"] if self.delivery.max_connections < self.count else []
        for domain, own in (self.delivery.domains or {}).items():
            if own.max_connections and own.max_connections < self.count:
                out.append(domain)
        return out

    @asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        """Hold one of this worker's connections to ``domain`` (waits while all are busy)."""
        self._users[domain] = self._users.get(domain, 0) + 1
        try:
            sem = self._slots.get(domain)
            if sem is None:
                sem = self._slots[domain] = asyncio.Semaphore(self.connections(domain))
            if sem.locked():  # all busy: this wait holds no delivery slot (Ticket)
                with _waiting():
                    await sem.acquire()
            else:
                await sem.acquire()
            try:
                yield
            finally:
                sem.release()
        finally:
            self._forget(domain)

    async def pace(self, domain: str) -> None:
        """Wait for the domain's rate limit (no-op without one)."""
        limiter = self._rates.get(domain)
        if limiter is None:
            rate = self.configured(domain)[1]
            if not rate:
                return
            part = rate / self.count
            limiter = self._rates[domain] = RateLimiter(part, capacity=part)
        if limiter.ready():
            await limiter.acquire()
            return
        with _waiting():
            await limiter.acquire()
        metrics.current().rate_limit_waits.inc()

    def _forget(self, domain: str) -> None:
        """Drop a domain's semaphore once nobody uses it, and rate limiters back at full
        capacity, so a worker that mails a million domains does not keep a million of each."""
        users = self._users.get(domain, 1) - 1
        if users > 0:
            self._users[domain] = users
            return
        self._users.pop(domain, None)
        self._slots.pop(domain, None)
        if len(self._rates) > RATE_LIMITERS_KEPT:
            for name in [n for n, r in self._rates.items() if r.is_full() and
                         n not in self._users]:
                del self._rates[name]
