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

``delivery.rate_limits.global`` is one more limit of the same kind over every remote
destination together (key ``*``), divided among the workers the same way.

Fleet mode (``cluster.url``): a backend (``set_backend``; ``empath/cluster/fleet.py``) holds the
limits for every node together: ``slot`` takes a connection lease from it and ``pace`` tokens
of a fleet-wide GCRA, and the worker shares above do not apply. While the backend cannot reach
Redis it says so (``acquire``/``take`` return None) and the node keeps to its share instead:
each limit divided by the nodes last seen alive (at least 1), then among its workers as above.

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
from typing import Any, Protocol

from empath.config.typed import DeliveryConfig
from empath.observe import metrics

RATE_LIMITERS_KEPT = 1000  # beyond this many, limiters with a full bucket are dropped
GLOBAL = "*"  # the rate-limit key of delivery.rate_limits.global
FALLBACK_POLL = 0.05  # fleet mode without Redis: seconds between looks for a free slot
QUIT_GRACE = 0.5  # fleet mode: seconds a slot outlives a delivery whose connection is closed


class SharedLimits(Protocol):
    """Limits held for a whole fleet of nodes (fleet mode's backend)."""

    def nodes(self) -> int:
        """Nodes last seen alive (at least 1): the fallback divides each limit by this."""

    async def acquire(self, domain: str, limit: int) -> Any:
        """A lease on one of ``limit`` connections to ``domain`` (waiting while all are
        taken), or None when the fleet cannot be asked (keep to the node's share)."""

    def release(self, lease: Any) -> None:
        """Give a lease from ``acquire`` back."""

    async def take(self, key: str, per_minute: int) -> bool | None:
        """One token of the fleet-wide limit ``key``; whether it waited; None when the fleet
        cannot be asked."""


_backend: SharedLimits | None = None


def set_backend(backend: SharedLimits | None) -> None:
    """Install (or remove) the fleet's limits for this process."""
    global _backend
    _backend = backend


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

    def __init__(self, delivery_cfg: DeliveryConfig, share: tuple[int, int] = (1, 1)) -> None:
        self.delivery = delivery_cfg
        self.index, self.count = share
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # deliveries in progress per domain
        self._leased: dict[str, int] = {}  # fleet mode: deliveries holding a lease
        self._fallback: dict[str, int] = {}  # fleet mode: deliveries on the node's share
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
        """Hold one of this worker's connections to ``domain`` (waits while all are busy);
        in fleet mode one of the fleet's."""
        if _backend is not None:
            async with self._fleet_slot(_backend, domain):
                yield
            return
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

    @asynccontextmanager
    async def _fleet_slot(self, shared: SharedLimits, domain: str) -> AsyncIterator[None]:
        """A lease from the fleet; while it cannot be asked, this node's share (deliveries
        of this worker still holding leases count against it)."""
        limit = self.configured(domain)[0]
        with _waiting():  # a lease may be a while: this wait holds no delivery slot (Ticket)
            while True:
                lease = await shared.acquire(domain, limit)  # None at once while Redis is down
                if lease is not None:
                    counts = self._leased
                    break
                permits = share_of(max(1, limit // shared.nodes()), self.index, self.count,
                                   domain)
                if self._leased.get(domain, 0) + self._fallback.get(domain, 0) < permits:
                    counts = self._fallback
                    break
                await asyncio.sleep(FALLBACK_POLL)
        counts[domain] = counts.get(domain, 0) + 1
        try:
            yield
        finally:
            if lease is not None:
                self._done(counts, domain)
                shared.release(lease)
            elif self.delivery.connection_reuse.max_idle > 0:
                self._done(counts, domain)
            else:  # without reuse the connection is still closing: count it a little longer
                asyncio.get_running_loop().call_later(QUIT_GRACE, self._done, counts, domain)

    @staticmethod
    def _done(counts: dict[str, int], domain: str) -> None:
        left = counts[domain] - 1
        if left:
            counts[domain] = left
        else:
            del counts[domain]

    async def pace(self, domain: str) -> None:
        """Wait for the domain's rate limit and the global one (no-op without either)."""
        waited = False
        rate = self.configured(domain)[1]
        if rate:
            waited = await self._take(domain, rate)
        overall = getattr(self.delivery.rate_limits, "global", None)
        if overall:
            waited = await self._take(GLOBAL, overall) or waited
        if waited:
            metrics.current().rate_limit_waits.inc()

    async def _take(self, key: str, rate: int) -> bool:
        """One token of limit ``key``: the fleet's, else this worker's share; whether it
        waited."""
        shared = _backend
        name, capacity = key, None
        part: float = rate / self.count
        if shared is not None:
            with _waiting():  # the fleet's token may be a while: hold no delivery slot
                waited = await shared.take(key, rate)
            if waited is not None:
                return waited
            # The fleet cannot be asked: this node's share, with a burst of one second's.
            nodes = shared.nodes()
            part = max(1.0, rate / nodes) / self.count
            name, capacity = f"{key} /{nodes}", max(1.0, part / 60)
        limiter = self._rates.get(name)
        if limiter is None:
            limiter = self._rates[name] = RateLimiter(part, capacity=capacity or part)
        if limiter.ready():
            return await limiter.acquire()
        with _waiting():
            return await limiter.acquire()

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
