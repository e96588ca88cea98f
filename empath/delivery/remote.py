"""Remote delivery: route a domain's recipients to a mail server and deliver over SMTP.

Owns the choice of *where* a message goes and *which connection* carries it:

- routing: the domain's ``mx_override``, else the ``smarthost``, else its MX hosts
  (``dns.py``) on ``delivery.port``;
- trying hosts in MX order and every address of each host: a refused or timed-out connection,
  or a 4xx/5xx greeting or EHLO, moves on to the next address and host (RFC 5321 §5.1); once a
  transaction has started, the server's replies are final for this attempt;
- an opportunistic STARTTLS whose handshake fails is retried on a new connection in plain;
- DNSSEC and DANE (``dnssec.py``, ``dane.py``): under the domain's DNSSEC mode every lookup
  of the route (MX, A/AAAA, TLSA) is judged, and under ``enforce`` an unvalidated one is a
  temporary failure for the domain (MX) or the host (addresses, TLSA). When the MX RRset
  (or the configured next hop) and the host's addresses are secure, the host's TLSA records
  (``_<port>._tcp.<host>``) are looked up; secure ones make the connection a DANE one. A
  failed TLSA lookup, or a DANE failure, skips the host (RFC 7672 §2.2), never to plain;
- connection reuse: an idle connection per server waits ``connection_reuse.max_idle`` seconds
  for the next message and carries at most ``max_messages``, with RSET before each reuse;
- limits per destination domain and per worker: ``max_connections`` simultaneous deliveries
  (a semaphore) and ``rate_limit`` messages per minute (a token bucket that waits).

The result of ``deliver`` is one RecipientOutcome per recipient plus a JSON-ready route record
for the attempt history. Never builds a spool path: the message is read through the
MessageSource the worker passes in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from empath.delivery import dnssec
from empath.delivery.connection import (
    DANEFailure,
    SMTPConnection,
    TLSHandshakeError,
    open_connection,
)
from empath.delivery.dane import DaneRequirement, requirement
from empath.delivery.dns import MXResolver
from empath.delivery.dnssec import RouteSecurity
from empath.delivery.errors import (
    DeliveryError,
    LocalSystemError,
    PermanentError,
    TemporaryError,
)
from empath.delivery.state import RecipientOutcome
from empath.delivery.tls import DISABLED, OPPORTUNISTIC, TLSContexts, TLSPolicy, policy_for
from empath.spool import MessageSource

log = logging.getLogger("empath.delivery.smtp")

_PoolKey = tuple[str, str, int, TLSPolicy, DaneRequirement | None]


RATE_LIMITERS_KEPT = 1000  # beyond this many, limiters with a full bucket are dropped


class _RateLimiter:
    """A token bucket: ``per_minute`` messages a minute, bursts up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def is_full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity

    async def acquire(self) -> None:
        while True:
            self._refill()
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self.tokens) / self.rate)


class RemoteTransport:
    """SMTP delivery to remote domains for one delivery worker."""

    def __init__(self, cfg: Any, *, resolver: MXResolver | None = None) -> None:
        self.cfg = cfg
        self.delivery = cfg.delivery
        self.helo = self.delivery.helo_name or cfg.hostname
        self.resolver = resolver or MXResolver(self.delivery.dns,
                                               detect_bogus=_dnssec_anywhere(self.delivery))
        self.contexts = TLSContexts(self.delivery.tls.ca_file)
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # deliveries in progress per domain
        self._rates: dict[str, _RateLimiter] = {}
        self._idle: dict[_PoolKey, list[SMTPConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- per-destination settings ---------------------------------------------------------
    def _domain_cfg(self, domain: str) -> Any:
        domains = self.delivery.domains or {}
        return domains.get(domain)

    def _semaphore(self, domain: str) -> asyncio.Semaphore:
        sem = self._limits.get(domain)
        if sem is None:
            own = self._domain_cfg(domain)
            limit = (own.max_connections if own is not None and own.max_connections
                     else self.delivery.max_connections)
            sem = self._limits[domain] = asyncio.Semaphore(limit)
        return sem

    def _rate_limiter(self, domain: str) -> _RateLimiter | None:
        if domain in self._rates:
            return self._rates[domain]
        own = self._domain_cfg(domain)
        rate = own.rate_limit if own is not None and own.rate_limit else None
        rate = rate or self.delivery.rate_limits.default
        limiter = _RateLimiter(rate) if rate else None
        if limiter is not None:
            self._rates[domain] = limiter
        return limiter

    def _forget(self, domain: str) -> None:
        """Drop a domain's semaphore once nobody uses it, and rate limiters back at full
        capacity, so a worker that mails a million domains does not keep a million of each."""
        users = self._users.get(domain, 1) - 1
        if users > 0:
            self._users[domain] = users
            return
        self._users.pop(domain, None)
        self._limits.pop(domain, None)
        if len(self._rates) > RATE_LIMITERS_KEPT:
            for name in [n for n, r in self._rates.items() if r.is_full() and
                         n not in self._users]:
                del self._rates[name]

    # -- the public contract --------------------------------------------------------------
    async def deliver(self, domain: str, envelope: dict[str, Any], rcpts: list[dict[str, Any]],
                      source: MessageSource
                      ) -> tuple[dict[str, RecipientOutcome], dict[str, Any]]:
        """Deliver ``source`` to ``rcpts`` (all in ``domain``); outcomes and a route record."""
        domain = domain.lower()
        started = time.monotonic()
        info: dict[str, Any] = {"domain": domain, "transport": "smtp", "server": None,
                                "ip": None, "port": None, "tls": None, "dsn": None,
                                "mx_index": None, "dnssec": None, "dane": None,
                                "duration": 0.0}
        self._users[domain] = self._users.get(domain, 0) + 1
        try:
            async with self._semaphore(domain):
                limiter = self._rate_limiter(domain)
                if limiter is not None:
                    await limiter.acquire()
                outcomes = await self._deliver_routed(domain, envelope, rcpts, source, info)
        except DeliveryError as err:
            outcomes = {r["address"]: err.outcome() for r in rcpts}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must defer, never fail, the recipients
            log.exception("%s: remote delivery to %s failed unexpectedly", envelope.get("id"),
                          domain)
            local = LocalSystemError.make("local", reason=type(exc).__name__)
            outcomes = {r["address"]: local.outcome() for r in rcpts}
        finally:
            self._forget(domain)
        info["duration"] = round(time.monotonic() - started, 6)
        return outcomes, info

    async def close(self) -> None:
        """QUIT every idle connection (at worker shutdown)."""
        self._closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        for conn in idle:
            self._quit_later(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- routing --------------------------------------------------------------------------
    async def _routes(self, domain: str, security: RouteSecurity
                      ) -> tuple[list[tuple[int, str, int]], bool, str | None]:
        """``(mx_index, host, port)`` in the order to try, whether the MX is implicit, and the
        DNSSEC state of the MX lookup (None: the next hop is configured, not looked up)."""
        own = self._domain_cfg(domain)
        if own is not None and own.mx_override is not None:
            return [(0, own.mx_override.host, own.mx_override.port)], False, None
        if self.delivery.smarthost is not None:
            smarthost = self.delivery.smarthost
            return [(0, smarthost.host, smarthost.port)], False, None
        answer, state = await security.observe(domain, "MX", self.resolver.lookup_mx(domain))
        hosts = answer.hosts
        me = (self.cfg.hostname or "").lower().rstrip(".")
        mine = [pref for pref, host in hosts if host == me]
        if mine:
            # RFC 5321 §5.1: this host is an MX of the domain: only hosts preferred over
            # us may take the message; none means it would loop back here.
            hosts = [(pref, host) for pref, host in hosts if pref < min(mine)]
            if not hosts:
                raise PermanentError.make("loops", domain=domain)
        port = self.delivery.port
        return [(i, host, port) for i, (_, host) in enumerate(hosts)], answer.implicit, state

    async def _deliver_routed(self, domain: str, envelope: dict[str, Any],
                              rcpts: list[dict[str, Any]], source: MessageSource,
                              info: dict[str, Any]) -> dict[str, RecipientOutcome]:
        security = RouteSecurity(self.resolver, dnssec.mode_for(self.delivery, domain))
        if security.active:
            info["dnssec_lookups"] = security.lookups  # filled in as lookups are made
        try:
            routes, implicit, mx_state = await self._routes(domain, security)
        finally:
            info["dnssec"] = security.route_state(list(security.lookups.values()))
        policy = policy_for(self.delivery, domain)
        errors: list[DeliveryError] = []
        for mx_index, host, port in routes:
            states = [mx_state] if mx_state else []
            info.update(server=host, ip=None, port=port, mx_index=mx_index, dane=None)
            try:
                addresses, dane = await self._prepare_host(domain, policy, host, port, mx_state,
                                                           security, states)
            except PermanentError as err:
                if implicit:
                    raise PermanentError.make("no_address", domain=domain) from None
                log.warning("%s: MX host %s of %s: %s", envelope.get("id"), host, domain, err)
                errors.append(TemporaryError.make("no_route", domain=domain))
                continue
            except TemporaryError as err:
                log.info("%s: MX host %s of %s: %s", envelope.get("id"), host, domain, err)
                if isinstance(err, DANEFailure):
                    info["dane"] = "failed"
                errors.append(err)
                continue
            finally:
                info["dnssec"] = security.route_state(states)
            info["dane"] = _dane_label(dane, security, policy)
            for ip in addresses:
                info.update(server=host, ip=ip, port=port, mx_index=mx_index)
                try:
                    conn = await self._connection(domain, policy, host, ip, port, dane)
                except DeliveryError as err:
                    log.info("%s: %s[%s]:%d for %s: %s", envelope.get("id"), host, ip, port,
                             domain, err)
                    if isinstance(err, DANEFailure):
                        info["dane"] = "failed"
                    errors.append(err)
                    continue
                info["tls"] = conn.tls
                if conn.dane is not None:
                    info["dane"] = conn.dane.status
                    if conn.dane.record is not None:
                        info["dane_match"] = conn.dane.description
                # Whether NOTIFY/ORCPT went on: the next hop then owns success notices.
                info["dsn"] = conn.extensions.has("DSN")
                try:
                    outcomes = await conn.deliver(envelope, rcpts, source)
                finally:
                    self._release(conn, policy, dane)
                return outcomes
        raise _final_error(errors, domain)

    async def _prepare_host(self, domain: str, policy: TLSPolicy, host: str, port: int,
                            mx_state: str | None, security: RouteSecurity, states: list[str]
                            ) -> tuple[list[str], DaneRequirement | None]:
        """The addresses of ``host`` and what DANE demands of it; the DNSSEC state of each
        lookup is added to ``states``. Raises a DeliveryError when the host is unusable."""
        answer, state = await security.observe(host, "A/AAAA",
                                               self.resolver.lookup_addresses(host), states)
        if answer.literal:  # nothing looked up, no name to bind TLSA records to
            if policy.requires_dane:
                raise DANEFailure.make("dane_required", domain=domain,
                                       reason=f"{host} is an address, without TLSA records")
            return answer.addresses, None
        # RFC 7672 §2.2.1/§2.2.2: TLSA records count only for a host whose name came from a
        # secure MX RRset (or the configuration) and whose addresses are secure.
        trusted = mx_state in (None, dnssec.SECURE) and state == dnssec.SECURE
        return answer.addresses, await self._dane(domain, policy, host, port, trusted,
                                                  security, states)

    async def _dane(self, domain: str, policy: TLSPolicy, host: str, port: int, trusted: bool,
                    security: RouteSecurity, states: list[str]) -> DaneRequirement | None:
        """What DANE demands of ``host`` (None: DANE does not apply, the TLS policy does)."""
        if policy.mode == DISABLED or not security.active:
            return None
        if not trusted:
            if policy.requires_dane:
                raise DANEFailure.make("dane_required", domain=domain, reason=(
                    f"the MX or address records of {host} are not DNSSEC-validated"))
            return None
        name = f"_{port}._tcp.{host.rstrip('.').lower()}"
        answer, state = await security.observe(name, "TLSA", self.resolver.lookup_tlsa(name),
                                               states)
        if state != dnssec.SECURE or not answer.records:
            if policy.requires_dane:
                raise DANEFailure.make("dane_required", domain=domain, reason=(
                    f"{host} has no DNSSEC-validated TLSA records"))
            return None
        req = requirement(host, answer.records)
        if policy.requires_dane and not req.authenticates:
            raise DANEFailure.make("dane_required", domain=domain, reason=(
                f"no TLSA record of {host} is usable"))
        return req

    # -- connections ----------------------------------------------------------------------
    async def _connection(self, domain: str, policy: TLSPolicy, host: str, ip: str,
                          port: int, dane: DaneRequirement | None) -> SMTPConnection:
        """An idle connection to this server that answers RSET, or a new one."""
        key: _PoolKey = (host, ip, port, policy, dane)
        reuse = self.delivery.connection_reuse
        pool = self._idle.get(key, [])
        while pool:
            conn = pool.pop()
            if time.monotonic() - conn.idle_since > reuse.max_idle:
                self._quit_later(conn)
                continue
            if await conn.reset():
                return conn
            conn.abort()

        async def connect(try_tls: bool) -> SMTPConnection:
            return await open_connection(
                server=host, ip=ip, port=port, helo=self.helo, domain=domain, policy=policy,
                contexts=self.contexts, timeouts=self.delivery.timeouts, try_tls=try_tls,
                dane=dane)

        try:
            return await connect(True)
        except TLSHandshakeError as err:
            if policy.mode != OPPORTUNISTIC or dane is not None:
                raise
            # RFC 7435: a failed opportunistic handshake must not stop delivery; plain it is.
            log.warning("%s[%s]:%d: %s; retrying without TLS", host, ip, port, err.text)
            return await connect(False)

    def _release(self, conn: SMTPConnection, policy: TLSPolicy,
                 dane: DaneRequirement | None) -> None:
        """Keep a healthy connection for the next message, or close it."""
        reuse = self.delivery.connection_reuse
        if (self._closed or conn.broken or conn.messages >= reuse.max_messages
                or reuse.max_idle <= 0):
            self._quit_later(conn)
            return
        key: _PoolKey = (conn.server, conn.ip, conn.port, policy, dane)
        self._idle.setdefault(key, []).append(conn)
        asyncio.get_running_loop().call_later(reuse.max_idle, self._expire, key, conn)

    def _expire(self, key: _PoolKey, conn: SMTPConnection) -> None:
        pool = self._idle.get(key)
        if not pool or conn not in pool:
            return  # reused (or closed) meanwhile; its own timer will come
        if time.monotonic() - conn.idle_since < self.delivery.connection_reuse.max_idle:
            return
        pool.remove(conn)
        if not pool:
            del self._idle[key]
        self._quit_later(conn)

    def _quit_later(self, conn: SMTPConnection) -> None:
        task = asyncio.ensure_future(conn.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())


def _dnssec_anywhere(delivery_cfg: Any) -> bool:
    """Whether any domain (or the default) consults DNSSEC: then SERVFAILs are checked for
    bogus answers."""
    if dnssec.mode_for(delivery_cfg, "") != dnssec.OFF:
        return True
    return any(dnssec.mode_for(delivery_cfg, d) != dnssec.OFF
               for d in (delivery_cfg.domains or {}))


def _dane_label(dane: DaneRequirement | None, security: RouteSecurity,
                policy: TLSPolicy) -> str:
    """The ``dane`` field of the route before connecting: off, none, or what is required."""
    if not security.active or policy.mode == DISABLED:
        return "off"
    if dane is None:
        return "none"
    return "required" if dane.authenticates else "unusable"


def _final_error(errors: list[DeliveryError], domain: str) -> DeliveryError:
    """Every host failed: permanent only if every one refused us permanently (5xx greeting or
    EHLO); otherwise the last temporary failure, so the message is retried."""
    if not errors:
        return TemporaryError.make("no_route", domain=domain)
    if all(err.is_permanent for err in errors):
        return errors[-1]
    temporary = [err for err in errors if not err.is_permanent]
    return temporary[-1]

