"""One process's membership of the fleet: its Redis connection and everything it shares.

A ``Fleet`` is made by ``empath.cluster.start`` in each receiver and delivery worker when
``cluster.url`` is set, and installs itself as the backend of ``delivery/limits.py``,
``delivery/breaker.py`` and ``spool/dedup.py``. It owns:

- **connection leases** (``acquire``/``release``): one Lua script drops expired leases,
  checks the count against the limit and adds ours, and reports the destination's breaker in
  the same round trip. A finished delivery's lease is *parked* while its connection may sit
  in the worker's connection pool (``delivery.connection_reuse.max_idle``, plus half a second
  for its QUIT): the next delivery to the domain in this worker, which takes that pooled
  connection, takes the lease with it without a round trip; it is released when that time is
  up, or at once when a delivery anywhere in the fleet waits for one (``want:<domain>``; the
  idle connection then stays in the pool without a lease until ``max_idle``). Without reuse
  (``max_idle: 0``) a lease is released half a second after its delivery, once the
  connection's QUIT is over. Held and parked leases are renewed together, one
  script per third of ``lease_time``; released leases go in one script per event-loop turn.
  A node killed outright stops renewing, and its leases expire within ``lease_time``.
- **rate limits** (``take``): GCRA in one script per destination (and ``*`` for
  ``delivery.rate_limits.global``), burst one second's worth (at least one message). Tokens
  are taken in batches spent locally within a second: the deliveries waiting on the same limit
  together, and a batch that doubles (up to a quarter of the burst) while each one is used up
  in time.
- **breakers** (``verdict``, ``opened``, ``closed``): ``brk:`` keys with the cool-down as TTL;
  a background refresh mirrors them each tick so a delivery is deferred before it waits for a
  lease, and the lease script is the exact word (it also hands out the single probe).
- **dedup** (``dedup_claim``/``dedup_release``): ``SET NX PX`` of the duplicate window.
- **heartbeat** (delivery workers): node name, version, queue counts, open breakers and held
  leases every ``cluster.heartbeat``; the count of nodes alive is kept for the fallback.

Redis down: any refused connection or a reply slower than ``cluster.timeout`` marks it down.
While down nothing waits on it: ``usable()`` is False and the callers fall back to their
local share (limit / nodes last seen alive, at least 1), the receiver to its local dedup; the
loop tries a PING every tick and comes back by itself; a warning at most once a minute; the
``empath_cluster_redis_up`` gauge follows. Nothing here touches the spool or sends mail.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

import empath
from empath.cluster import node_name, scripts
from empath.config.typed import Config
from empath.delivery import breaker as breaker_mod
from empath.delivery import limits as limits_mod
from empath.delivery.limits import QUIT_GRACE
from empath.observe import metrics
from empath.spool import dedup as dedup_mod

log = logging.getLogger("empath.cluster")

TICK = 0.5  # seconds between passes of the background loop (Redis down: one PING a pass)
FAST_TICK = 0.1  # while this process holds leases: how often it asks who else waits
WARN_EVERY = 60.0  # at most one "Redis unreachable" warning a minute
LOCAL_TOKENS_VALID = 1.0  # seconds a batch of rate tokens may be spent locally
POLL_MIN, POLL_MAX = 0.005, 0.05  # waiting for a lease: the first and the longest pause
POOL_SIZE = 32  # Redis connections per process (most: one per busy destination)
ALIVE_HEARTBEATS = 3  # a node unheard of for this many heartbeats is gone
NODE_RECORD_KEPT = 86400.0  # a gone node's record stays this long for the fleet view

# What ``verdict`` says about a destination's breaker.
CLOSED, OPEN, PROBE, PROBING = "closed", "open", "probe", "probing"
_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
             asyncio.TimeoutError)

# The breaker's word from the lease script, for the delivery (task) that took the lease.
_granted: contextvars.ContextVar[tuple[str, str, float, int] | None] = contextvars.ContextVar(
    "empath_fleet_verdict", default=None)


class Unavailable(Exception):
    """Redis cannot be used now: the caller falls back to its local share."""


def connection_options(cfg: Config) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` (sync or asyncio) from ``cfg.cluster``."""
    c = cfg.cluster
    options: dict[str, Any] = {"db": c.db, "socket_timeout": c.timeout,
                               "socket_connect_timeout": c.timeout, "decode_responses": True}
    if c.password_file:
        with open(c.password_file, encoding="utf-8") as fh:
            words = (fh.readline().strip()).split(None, 1)
        if len(words) == 2:
            options["username"], options["password"] = words
        elif words:
            options["password"] = words[0]
    if str(c.url).startswith("rediss://") and c.ca_file:
        options["ssl_ca_certs"] = c.ca_file
    return options


@dataclass
class Lease:
    domain: str
    id: str | None  # None: no slot taken (the breaker is open)


@dataclass
class _Bucket:
    """Rate tokens fetched in a batch, spent locally for a short while."""

    tokens: int = 0
    until: float = 0.0
    waiting: int = 0
    batch: int = 1  # tokens asked for next time: doubles while batches are used up in time
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Fleet:
    def __init__(self, cfg: Config, kind: str, index: int = 1, count: int = 1) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.kind, self.index, self.count = kind, index, count
        self.node = node_name(cfg)
        self.prefix = c.key_prefix
        self.lease_ms = int(c.lease_time * 1000)
        self.heartbeat = float(c.heartbeat)
        # A few connections per process, shared by every coroutine (one waits for a free
        # one at most cluster.timeout); each script is one short round trip.
        assert c.url is not None  # fleet mode: cluster.url is set
        pool = aioredis.BlockingConnectionPool.from_url(
            c.url, max_connections=POOL_SIZE, timeout=c.timeout, **connection_options(cfg))
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        self.up = False
        self.alive = 1  # nodes last seen alive (for the fallback shares)
        self._warned = 0.0
        self._down_since: float | None = None
        self._scripts = {name: self.redis.register_script(getattr(scripts, name))
                         for name in ("ACQUIRE", "RENEW", "RELEASE", "TAKE", "OPEN", "CLOSE",
                                      "BREAKERS", "DEDUP_CLAIM", "DELETE_IF", "HEARTBEAT",
                                      "WANTED")}
        self._held: dict[str, str] = {}  # lease id -> domain (in use)
        self._parked: dict[str, list[tuple[str, float]]] = {}  # domain -> [(id, since)]
        self._releasing: list[tuple[str, str]] = []
        self._acquiring: dict[str, list[Any]] = {}  # domain -> [lock, deliveries waiting]
        self._others: dict[str, int] = {}  # destination -> other processes waiting for it
        self._limits: dict[str, int] = {}  # destination -> its limit, as last asked
        self._counts: dict[str, int] = {}  # destination -> leases this process uses
        self.process = f"{self.node}:{os.getpid()}"
        self._release_task: asyncio.Task[None] | None = None
        self._freed: dict[str, asyncio.Event] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._mirror: dict[str, tuple[str, float, int]] = {}  # domain -> (state, until, fails)
        self._opened_here: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._last_renew = 0.0
        self._last_beat = 0.0
        self._last_slow = 0.0
        # A finished delivery's connection may stay open this long (idle in the pool, then
        # its QUIT): its lease stays parked as long.
        self.reuse = float(cfg.delivery.connection_reuse.max_idle) > 0
        self.linger = float(cfg.delivery.connection_reuse.max_idle) + QUIT_GRACE
        self.gauge = metrics.current()

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self._probe()
        if not self.up:
            self._fail(None)
        limits_mod.set_backend(self)
        breaker_mod.set_backend(self)
        dedup_mod.set_backend(self)
        if self.kind == "delivery":
            await self._beat()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        limits_mod.set_backend(None)
        breaker_mod.set_backend(None)
        dedup_mod.set_backend(None)
        if self._loop_task is not None:
            self._loop_task.cancel()
        for domain, parked in self._parked.items():
            self._releasing.extend((domain, lease) for lease, _ in parked)
        self._parked.clear()
        self._releasing.extend((d, lease) for lease, d in self._held.items())
        self._held.clear()
        if self.up:
            await self._flush_releases()
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        await self.redis.aclose()

    # -- up and down --------------------------------------------------------------------------
    def usable(self) -> bool:
        return self.up

    def nodes(self) -> int:
        return max(1, self.alive)

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script; Unavailable (and Redis marked down) when Redis does not answer."""
        if not self.up:
            raise Unavailable
        try:
            return await self._scripts[name](keys=keys, args=args)
        except _FAILURES as exc:
            self._fail(exc)
            raise Unavailable from exc

    def _fail(self, exc: BaseException | None) -> None:
        now = time.monotonic()
        first = self.up or self._down_since is None
        self.up = False
        if self._down_since is None:
            self._down_since = now
        self.gauge.cluster_redis_up(False)
        if first or now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("cluster: Redis at %s unreachable (%s); each node keeps to its share "
                        "of every limit (%d nodes last seen alive)", self.cfg.cluster.url,
                        exc or "no answer", self.nodes())

    async def _probe(self) -> None:
        try:
            await self.redis.ping()
        except _FAILURES as exc:
            if self.up:
                self._fail(exc)
            elif time.monotonic() - self._warned >= WARN_EVERY:
                self._fail(exc)
            return
        if not self.up:
            if self._down_since is not None:
                log.warning("cluster: Redis at %s reachable again; limits are shared again",
                            self.cfg.cluster.url)
            self.up, self._down_since = True, None
            self.gauge.cluster_redis_up(True)
            self._last_renew = 0.0  # put back every lease held meanwhile at once

    # -- the background loop ------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(FAST_TICK)
            try:
                await self._tick()
            except Unavailable:
                pass
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything
                log.exception("cluster: background pass failed")

    async def _tick(self) -> None:
        now = time.monotonic()
        if self._parked or self._held:
            self._expire_parked(now)
            if self.up:  # a fair part of a busy destination is learnt quickly
                await self._give_back_wanted()
        if now - self._last_slow < TICK:
            return
        self._last_slow = now
        if not self.up:
            await self._probe()
            if not self.up:
                return
        if self.kind == "delivery":
            if now - self._last_renew >= self.lease_ms / 3000:
                await self._renew()
            if now - self._last_beat >= self.heartbeat:
                await self._beat()
            await self._refresh_breakers()

    async def _renew(self) -> None:
        leases = list(self._held.items())
        leases += [(lease, d) for d, parked in self._parked.items() for lease, _ in parked]
        self._last_renew = time.monotonic()
        if leases:
            await self._run("RENEW", [self._conn(d) for _, d in leases],
                            [self.lease_ms, *[lease for lease, _ in leases]])

    async def _beat(self) -> None:
        self._last_beat = time.monotonic()
        record: dict[str, Any] = {"pid": os.getpid(), "time": time.time(),
                                  "leases": len(self._held),
                                  "breakers": sorted(self._opened_here)}
        if self.index == 1:
            from empath.spool import Spool
            from empath.spool.queue import state_counts

            spool = Spool(self.cfg.spool.path)
            counts, _ = await asyncio.to_thread(state_counts, spool)
            record.update(version=empath.__version__, workers=self.count, queue=counts,
                          hostname=self.cfg.hostname)
        window = int(self.heartbeat * ALIVE_HEARTBEATS * 1000)
        try:
            alive = await self._run("HEARTBEAT", [self.prefix + "nodes", self._node_key()],
                                    [self.node, f"worker:{self.index}",
                                     json.dumps(record, sort_keys=True), window,
                                     int(NODE_RECORD_KEPT * 1000)])
        except Unavailable:
            return
        self.alive = max(1, int(alive))

    def _node_key(self) -> str:
        return f"{self.prefix}node:{self.node}"

    # -- connection leases --------------------------------------------------------------------
    def _conn(self, domain: str) -> str:
        return f"{self.prefix}conn:{domain}"

    def _want(self, domain: str) -> str:
        return f"{self.prefix}want:{domain}"

    def _brk(self, part: str, domain: str) -> str:
        return f"{self.prefix}brk:{part}:{domain}"

    async def acquire(self, domain: str, limit: int) -> Lease | None:
        """A lease on one of ``limit`` fleet-wide connections to ``domain`` (waits while all
        are taken); a lease without a slot when the breaker is open; None when Redis cannot
        be used (the caller keeps to this node's share)."""
        _granted.set(None)
        self._limits[domain] = limit
        quick = self._take_parked(domain)
        if quick is not None:
            return quick
        # One delivery per destination asks Redis at a time; the others of this process wait
        # for it here (a busy destination costs one poll, not one per waiting delivery).
        waiting = self._acquiring.get(domain)
        if waiting is None:
            waiting = self._acquiring[domain] = [asyncio.Lock(), 0]
        waiting[1] += 1
        try:
            async with waiting[0]:
                return await self._acquire(domain, limit)
        finally:
            waiting[1] -= 1
            if not waiting[1]:
                del self._acquiring[domain]
                self._freed.pop(domain, None)

    def _take_parked(self, domain: str) -> Lease | None:
        """A parked lease of ``domain``, unless its breaker is not closed or a delivery
        elsewhere waits for the destination (then the lease goes back to Redis)."""
        lease = self._unpark(domain)
        if lease is None:
            return None
        if domain in self._mirror or not self._may_keep(domain):
            self._release_later(domain, lease)
            for other, _ in self._parked.pop(domain, []):
                self._release_later(domain, other)
            return None
        self._hold(lease, domain)  # no round trip
        _granted.set((domain, CLOSED, 0.0, 0))
        return Lease(domain, lease)

    async def _acquire(self, domain: str, limit: int) -> Lease | None:
        pause = POLL_MIN
        while True:
            quick = self._take_parked(domain)
            if quick is not None:
                return quick
            lease = uuid.uuid4().hex
            try:
                granted, state, ms, failures = await self._run(
                    "ACQUIRE", [self._conn(domain), self._brk("open", domain),
                                self._brk("half", domain), self._brk("probe", domain),
                                self._want(domain)],
                    [limit, lease, self.lease_ms, self.node, self.process])
            except Unavailable:
                return None
            verdict = (CLOSED, OPEN, PROBE, PROBING)[int(state)]
            if verdict in (OPEN, PROBING):
                self._mirror[domain] = (verdict, time.monotonic() + int(ms) / 1000,
                                        int(failures))
                _granted.set((domain, verdict, int(ms) / 1000, int(failures)))
                return Lease(domain, None)
            if int(granted):
                self._hold(lease, domain)
                if verdict == CLOSED:
                    self._mirror.pop(domain, None)
                _granted.set((domain, verdict, 0.0, 0))
                return Lease(domain, lease)
            event = self._freed.setdefault(domain, asyncio.Event())
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), pause)
            except TimeoutError:
                pass
            pause = min(POLL_MAX, pause * 2)

    def _unpark(self, domain: str) -> str | None:
        parked = self._parked.get(domain)
        if not parked:
            return None
        lease = parked.pop()[0]
        if not parked:
            del self._parked[domain]
        return lease

    def release(self, lease: Lease) -> None:
        """The delivery is over: park the lease while its connection may be pooled, or give
        it back (in the next batch)."""
        if lease.id is None or self._held.pop(lease.id, None) is None:
            return
        left = self._counts.get(lease.domain, 1) - 1
        if left > 0:
            self._counts[lease.domain] = left
        else:
            self._counts.pop(lease.domain, None)
        if not self.up or (self.reuse and not self._may_keep(lease.domain)):
            self._release_later(lease.domain, lease.id)
        elif self.reuse:
            self._parked.setdefault(lease.domain, []).append((lease.id, time.monotonic()))
        else:  # no pool: the connection is closing; its lease goes once the QUIT is done
            asyncio.get_running_loop().call_later(QUIT_GRACE, self._release_later,
                                                  lease.domain, lease.id)
        event = self._freed.get(lease.domain)
        if event is not None:
            event.set()

    def _expire_parked(self, now: float) -> None:
        for domain in list(self._parked):
            keep = []
            for lease, since in self._parked[domain]:
                if now - since >= self.linger:
                    self._release_later(domain, lease)
                else:
                    keep.append((lease, since))
            if keep:
                self._parked[domain] = keep
            else:
                del self._parked[domain]
                self._freed.pop(domain, None)

    def _hold(self, lease: str, domain: str) -> None:
        self._held[lease] = domain
        self._counts[domain] = self._counts.get(domain, 0) + 1

    def _may_keep(self, domain: str) -> bool:
        """Whether this process may keep one more lease of ``domain`` for itself (parked, or
        handed to its next delivery): always while no other process waits for the
        destination, else while it uses less than its fair part of the limit."""
        others = self._others.get(domain, 0)
        if not others:
            return True
        fair = -(-self._limits.get(domain, 1) // (others + 1))
        return self._counts.get(domain, 0) + len(self._parked.get(domain, ())) < fair

    async def _give_back_wanted(self) -> None:
        """Learn how many other processes wait for each destination this process holds
        leases of; parked leases beyond the fair part go back."""
        domains = list(set(self._parked) | set(self._held.values()))
        counts = await self._run("WANTED", [self._want(d) for d in domains], [self.process])
        self._others = {d: int(n) for d, n in zip(domains, counts, strict=True) if int(n)}
        self._limits = {d: n for d, n in self._limits.items()
                        if d in self._acquiring or d in self._counts or d in self._parked}
        for domain in list(self._parked):
            while self._parked.get(domain) and not self._may_keep(domain):
                lease = self._unpark(domain)
                if lease is not None:
                    self._release_later(domain, lease)

    def _release_later(self, domain: str, lease: str) -> None:
        self._releasing.append((domain, lease))
        if self._release_task is None or self._release_task.done():
            self._release_task = self._spawn(self._flush_releases())

    async def _flush_releases(self) -> None:
        batch, self._releasing = self._releasing, []
        if batch and self.up:
            try:
                await self._run("RELEASE", [self._conn(d) for d, _ in batch],
                                [lease for _, lease in batch])
            except Unavailable:
                pass  # they expire on their own within lease_time

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- rate limits --------------------------------------------------------------------------
    async def take(self, key: str, per_minute: int) -> bool | None:
        """One token of the fleet-wide ``per_minute`` limit ``key`` (a domain, or ``*``);
        whether it had to wait; None when Redis cannot be used."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
        if bucket.tokens > 0 and time.monotonic() < bucket.until:
            bucket.tokens -= 1
            return False
        interval = 60000.0 / per_minute
        burst = max(1, per_minute // 60)
        waited = False
        bucket.waiting += 1
        try:
            async with bucket.lock:
                while True:
                    if bucket.tokens > 0 and time.monotonic() < bucket.until:
                        bucket.tokens -= 1
                        return waited
                    # Used up the last batch in time: ask for twice as many (one round trip
                    # for many messages); let one expire unused: back to what is waiting.
                    # At most a quarter of the burst at a time: tokens held here are spent
                    # a little later than taken, and what all processes hold may come out
                    # at once on top of the burst (so slow limits are not batched at all).
                    cap = max(1, burst // 4)
                    now = time.monotonic()
                    if bucket.until and now < bucket.until:
                        bucket.batch = min(cap, bucket.batch * 2)
                    elif bucket.until:
                        bucket.batch = 1
                    want = min(cap, max(bucket.waiting, bucket.batch))
                    try:
                        got, wait_ms = await self._run(
                            "TAKE", [f"{self.prefix}rate:{key}"], [interval, burst, want])
                    except Unavailable:
                        return None
                    if int(got) > 0:
                        bucket.tokens = int(got) - 1
                        bucket.until = time.monotonic() + LOCAL_TOKENS_VALID
                        return waited
                    bucket.until = 0.0
                    waited = True
                    await asyncio.sleep(min(max(float(wait_ms), 1.0), 5000.0) / 1000)
        finally:
            bucket.waiting -= 1

    # -- breakers -----------------------------------------------------------------------------
    def verdict(self, domain: str, admitted: bool) -> tuple[str, float, int]:
        """``(state, seconds left, failures)`` of the fleet's breaker for ``domain``: with
        ``admitted``, the word the lease script gave this delivery; else the mirror."""
        if admitted:
            granted = _granted.get()
            if granted is not None and granted[0] == domain:
                return granted[1], granted[2], granted[3]
        state, until, failures = self._mirror.get(domain, (CLOSED, 0.0, 0))
        left = until - time.monotonic()
        if state == OPEN and left > 0:
            return OPEN, left, failures
        return CLOSED, 0.0, 0

    def opened(self, domain: str, cooldown: float, failures: int) -> None:
        self._mirror[domain] = (OPEN, time.monotonic() + cooldown, failures)
        self._opened_here.add(domain)
        self._spawn(self._quietly("OPEN", self._brk_keys(domain),
                                  [domain, self.node, int(cooldown * 1000), failures]))

    def closed(self, domain: str) -> None:
        self._mirror.pop(domain, None)
        self._opened_here.discard(domain)
        self._spawn(self._quietly("CLOSE", self._brk_keys(domain), [domain]))

    def probe_over(self, domain: str) -> None:
        """A probe ended without a word on the destination: let another delivery probe."""
        self._spawn(self._quietly("DELETE_IF", [self._brk("probe", domain)], [self.node]))

    def _brk_keys(self, domain: str) -> list[str]:
        return [self._brk("open", domain), self._brk("half", domain),
                self._brk("probe", domain), self.prefix + "breakers"]

    async def _quietly(self, name: str, keys: list[str], args: list[Any]) -> None:
        try:
            await self._run(name, keys, args)
        except Unavailable:
            pass

    async def _refresh_breakers(self) -> None:
        rows = await self._run("BREAKERS", [self.prefix + "breakers"], [self.prefix])
        now = time.monotonic()
        mirror: dict[str, tuple[str, float, int]] = {}
        for domain, open_ms, half, probing in rows:
            if int(open_ms) > 0:
                mirror[domain] = (OPEN, now + int(open_ms) / 1000, 0)
            elif int(half) or int(probing):
                mirror[domain] = (PROBE, now, 0)
        for domain, entry in self._mirror.items():  # keep the failures count we know
            if domain in mirror and entry[2]:
                state, until, _ = mirror[domain]
                mirror[domain] = (state, until, entry[2])
        self._mirror = mirror
        self._opened_here &= set(mirror)

    # -- dedup --------------------------------------------------------------------------------
    async def dedup_claim(self, key: str, queue_id: str, window: float) -> str | None:
        """Claim ``key`` fleet-wide: None when ours, else the original queue id. Raises
        Unavailable when Redis cannot be used."""
        original = await self._run("DEDUP_CLAIM", [f"{self.prefix}dedup:{key}"],
                                   [queue_id, max(1, int(window * 1000))])
        return None if original is None else str(original)

    def dedup_release(self, key: str, queue_id: str) -> None:
        self._spawn(self._quietly("DELETE_IF", [f"{self.prefix}dedup:{key}"], [queue_id]))
