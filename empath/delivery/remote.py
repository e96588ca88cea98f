"""Remote delivery: route a domain's recipients to a mail server and deliver over SMTP.

Owns the choice of *where* a message goes and *which connection* carries it:

- routing: the domain's ``mx_override``, else the ``smarthost``, else its MX hosts
  (``dns.py``) on ``delivery.port``;
- trying hosts in MX order and every address of each host: a refused or timed-out connection,
  or a 4xx/5xx greeting or EHLO, moves on to the next address and host (RFC 5321 §5.1); once a
  transaction has started, the server's replies are final for this attempt;
- an opportunistic STARTTLS whose handshake cannot complete is retried on a new connection
  in plain; a certificate that merely fails verification is not such a failure: the new
  connection is encrypted without verification, and the result (``tls.verified``,
  ``tls.verify_error``) is recorded in the route record and logged (RFC 7435: opportunistic
  means encrypt whenever offered). ``required``, MTA-STS and DANE never fall back;
- loops: a route whose server is this host (an address and port we listen on; a wildcard
  listener means any local address) fails the recipients with "mail for <domain> loops back
  to myself" (5.4.6) instead of connecting, as Postfix does; more preferred MX hosts that
  failed make it a deferral instead. An MX exchange spelled like an address (``127.0.0.1.``)
  is a name and is looked up as one (RFC 5321 §5.1 wants names there);
- at most ``delivery.mx_address_limit`` addresses and ``delivery.mx_session_limit`` sessions
  (connections a server answered) per attempt, as Postfix's limits of the same names;
- DNSSEC and DANE (``dnssec.py``, ``dane.py``): under the domain's DNSSEC mode every lookup
  of the route (MX, A/AAAA, TLSA) is judged, and under ``enforce`` an unvalidated one is a
  temporary failure for the domain (MX) or the host (addresses, TLSA). When the MX RRset
  (or the configured next hop) and the host's addresses are secure, the host's TLSA records
  (``_<port>._tcp.<host>``) are looked up; secure ones make the connection a DANE one. A
  failed TLSA lookup, or a DANE failure, skips the host (RFC 7672 §2.2), never to plain;
- MTA-STS (``mtasts.py``, RFC 8461), with ``delivery.mta_sts.enabled``, for MX routes under
  an opportunistic or required TLS policy: in mode ``enforce`` only MX hosts the policy names
  are used, each with mandatory STARTTLS and a certificate valid for its name; in ``testing``
  what would have failed is logged and recorded, and delivery goes on as without a policy. A
  host with DANE is reached with DANE only (RFC 8461 §2: DANE takes precedence);
- connection reuse (``pool.py``);
- limits per destination domain (``limits.py``): this worker's share of ``max_connections``
  and of ``rate_limit``, so the configured numbers hold for all workers together; and the
  destination's circuit breaker (``breaker.py``), which defers at once, without connecting,
  while a domain that reached no server several times in a row cools down.

The result of ``deliver`` is one RecipientOutcome per recipient plus a JSON-ready route record
for the attempt history. Never builds a spool path: the message is read through the
MessageSource the worker passes in.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from empath.config.typed import Config, DeliveryConfig, ListenerConfig
from empath.config.types import parse_address
from empath.delivery import dnssec
from empath.delivery.breaker import REACHED, UNKNOWN, UNREACHABLE, CircuitBreakers, CircuitOpen
from empath.delivery.connection import (
    ConnectFailure,
    SMTPConnection,
    StaleConnection,
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
from empath.delivery.handshake import (
    CertificateUnverified,
    DANEFailure,
    TLSHandshakeError,
    TLSPolicyFailure,
)
from empath.delivery.limits import DestinationLimits
from empath.delivery.mtasts import PolicyCache, StsCheck
from empath.delivery.mtasts_fetch import PolicyFetcher
from empath.delivery.pool import ConnectionPool, PoolKey, quits_awaited
from empath.delivery.state import RecipientOutcome
from empath.delivery.strategy import NEXT_HOP
from empath.delivery.tls import DISABLED, OPPORTUNISTIC, TLSContexts, TLSPolicy, policy_for
from empath.observe import deliveries, tracing
from empath.spool import MessageSource
from empath.spool.records import Envelope, Recipient, Route, new_route

log = logging.getLogger("empath.delivery.smtp")


@dataclass(slots=True)
class _Route:
    """Where a domain's mail goes: ``(mx_index, host, port)`` in the order to try."""

    hosts: list[tuple[int, str, int]]
    implicit: bool = False  # no MX records: the domain is its own mail host
    mx_state: str | None = None  # DNSSEC state of the MX lookup (None: configured next hop)
    configured: bool = False  # mx_override or smarthost, not looked up


@dataclass(slots=True)
class _Reach:
    """What one delivery learned about its destination, for the circuit breaker."""

    failed: int = 0  # connections that reached no usable server
    reached: bool = False  # a server answered (even if TLS or the transaction then failed)

    @property
    def outcome(self) -> str:
        return REACHED if self.reached else UNREACHABLE if self.failed else UNKNOWN


def _unreachable(err: DeliveryError) -> bool:
    """Whether a failed connection says the server is not there: refused, timed out, closed,
    a 4xx/5xx greeting or EHLO; not a TLS or DANE policy failure, nor a local problem."""
    return not isinstance(err, (TLSPolicyFailure, DANEFailure, LocalSystemError))


@functools.lru_cache(maxsize=256)
def _is_local_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this machine: loopback, or one a socket can bind to
    (the kernel's own answer; no interface list to keep up to date)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


class OwnAddresses:
    """The endpoints this host receives mail on (its configured listeners), to spot a route
    that would loop back here. A listener on 0.0.0.0 or :: stands for every local address;
    one on port 0 (a port picked at start-up) cannot be matched and is left out."""

    def __init__(self, listeners: Iterable[ListenerConfig] | None) -> None:
        self.endpoints: list[tuple[str, int]] = []
        self._known: dict[tuple[str, int], bool] = {}
        for listener in listeners or ():
            host, port = listener.address.host, int(listener.address.port)
            if not port:
                continue
            try:
                ipaddress.ip_address(host)
                hosts = [host]
            except ValueError:  # a name: what it stands for, once, at start-up
                try:
                    hosts = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port)})
                except OSError:
                    hosts = []
            self.endpoints.extend((h, port) for h in hosts)

    def is_me(self, ip: str, port: int) -> bool:
        """Whether ``ip``:``port`` is one of this host's listeners (remembered per address:
        asked for every message sent)."""
        key = (ip, port)
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= 4096:
                self._known.clear()
            known = self._known[key] = self._is_me(ip, port)
        return known

    def _is_me(self, ip: str, port: int) -> bool:
        try:
            target = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for host, listen_port in self.endpoints:
            if listen_port != port:
                continue
            listen = ipaddress.ip_address(host)
            if listen.is_unspecified:
                if _is_local_address(ip):
                    return True
            elif listen == target:
                return True
        return False


class RemoteTransport:
    """SMTP delivery to remote domains for one delivery worker.

    ``share`` is ``(index, count)``: this worker's 1-based position among the ``count``
    delivery workers; per-destination limits are divided accordingly (``limits.py``)."""

    def __init__(self, cfg: Config, *, resolver: MXResolver | None = None,
                 share: tuple[int, int] = (1, 1)) -> None:
        self.cfg = cfg
        self.delivery = cfg.delivery
        self.helo = self.delivery.helo_name or cfg.hostname
        self.resolver = resolver or MXResolver(self.delivery.dns,
                                               detect_bogus=_dnssec_anywhere(self.delivery))
        self.contexts = TLSContexts(self.delivery.tls.ca_file)
        self.limits = DestinationLimits(self.delivery, share)
        self.breakers = CircuitBreakers(self.delivery)
        self.pool = ConnectionPool(self.delivery.connection_reuse)
        self.me = OwnAddresses(getattr(cfg, "listeners", None))
        self.fetcher: PolicyFetcher | None = None
        self.policies: PolicyCache | None = None
        sts = self.delivery.mta_sts
        if sts.enabled:
            self.fetcher = PolicyFetcher(sts, self.delivery.tls.ca_file, self.resolver)
            self.policies = PolicyCache(self.resolver.lookup_txt, self.fetcher.fetch,
                                        int(sts.cache_size))
        index, count = share
        if count > 1:
            log.info("delivery worker %d of %d: per-destination limits divided among %d "
                     "workers", index, count, count)
            if index == 1 and self.limits.undivided():
                log.warning("max_connections below the number of delivery workers (%d) for "
                            "%s: each worker keeps 1, so up to %d connections", count,
                            ", ".join(self.limits.undivided()), count)

    # -- the public contract --------------------------------------------------------------
    @tracing.route
    async def deliver(self, domain: str, envelope: Envelope, rcpts: list[Recipient],
                      source: MessageSource
                      ) -> tuple[dict[str, RecipientOutcome], Route]:
        """Deliver ``source`` to ``rcpts`` (all in ``domain``); outcomes and a route record."""
        domain = domain.lower()
        started = time.monotonic()
        info = new_route(domain, "smtp", server=None, ip=None, port=None, tls=None, dsn=None,
                         mx_index=None, dnssec=None, dane=None)
        try:
            self.breakers.check(domain)  # open: no need to wait for a slot
            # The slot is held until the connection's QUIT is over, not only the delivery.
            async with self.limits.slot(domain), quits_awaited():
                outcomes = await self._deliver_admitted(domain, envelope, rcpts, source, info)
        except CircuitOpen as err:  # the worker logs the deferral of each recipient
            info["breaker"] = "open"
            outcomes = {r["address"]: err.outcome() for r in rcpts}
        except DeliveryError as err:
            outcomes = {r["address"]: err.outcome() for r in rcpts}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must defer, never fail, the recipients
            log.exception("%s: remote delivery to %s failed unexpectedly", envelope.get("id"),
                          domain)
            local = LocalSystemError.make("local", reason=type(exc).__name__)
            outcomes = {r["address"]: local.outcome() for r in rcpts}
        info["duration"] = round(time.monotonic() - started, 6)
        return outcomes, info

    async def _deliver_admitted(self, domain: str, envelope: Envelope,
                                rcpts: list[Recipient], source: MessageSource,
                                info: Route) -> dict[str, RecipientOutcome]:
        """With a connection slot held: the breaker's word, the rate limit, the delivery."""
        probe = self.breakers.admit(domain)
        if probe:
            info["breaker"] = "probe"
        reach = _Reach()
        try:
            await self.limits.pace(domain)
            return await self._deliver_routed(domain, envelope, rcpts, source, info, reach)
        finally:
            self.breakers.record(domain, reach.outcome, probe)

    async def close(self) -> None:
        """QUIT every idle connection (at worker shutdown), close the HTTPS client."""
        await self.pool.close()
        if self.fetcher is not None:
            await self.fetcher.close()

    def idle_connections(self) -> int:
        return self.pool.idle_connections()

    # -- routing --------------------------------------------------------------------------
    async def _route(self, domain: str, security: RouteSecurity) -> _Route:
        """Where ``domain``'s mail goes, in the order to try."""
        hook_hop = NEXT_HOP.get()
        if hook_hop is not None:  # a delivery hook routed this attempt (strategy.py)
            hop = parse_address(hook_hop, 25)
            return _Route([(0, hop.host, hop.port)], configured=True)
        own = (self.delivery.domains or {}).get(domain)
        if own is not None and own.mx_override is not None:
            hop = own.mx_override
            return _Route([(0, hop.host, hop.port)], configured=True)
        if self.delivery.smarthost is not None:
            hop = self.delivery.smarthost
            return _Route([(0, hop.host, hop.port)], configured=True)
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
        return _Route([(i, host, port) for i, (_, host) in enumerate(hosts)], answer.implicit,
                      state)

    async def _mta_sts(self, domain: str, route: _Route, policy: TLSPolicy,
                       info: Route) -> StsCheck | None:
        """The MTA-STS check of this delivery, or None (disabled, not applicable, no policy);
        ``info`` gets ``mta_sts`` when the feature is on."""
        if self.policies is None:
            return None
        if route.configured or not policy.allows_mta_sts:
            info["mta_sts"] = "skipped"  # a configured next hop, or tls disabled or dane
            return None
        try:
            sts = await self.policies.policy(domain)
        except Exception:  # a bug: go on as without a policy (RFC 8461 §5.1 for failures)
            log.exception("MTA-STS: policy lookup for %s failed unexpectedly", domain)
            sts = self.policies.cached(domain)
        info["mta_sts"] = sts.mode if sts is not None else "no-policy"
        check = StsCheck.of(domain, sts, verify=policy.verify)
        if check is not None:
            info["mta_sts_result"] = None
        return check

    async def _deliver_routed(self, domain: str, envelope: Envelope,
                              rcpts: list[Recipient], source: MessageSource,
                              info: Route, reach: _Reach
                              ) -> dict[str, RecipientOutcome]:
        security = RouteSecurity(self.resolver, dnssec.mode_for(self.delivery, domain))
        if security.active:
            info["dnssec_lookups"] = security.lookups  # filled in as lookups are made
        try:
            route = await self._route(domain, security)
        finally:
            info["dnssec"] = security.route_state(list(security.lookups.values()))
        policy = policy_for(self.delivery, domain)
        sts = await self._mta_sts(domain, route, policy, info)
        errors: list[DeliveryError] = []
        mx_state = route.mx_state
        tried = sessions = 0
        address_limit = int(self.delivery.mx_address_limit)
        session_limit = int(self.delivery.mx_session_limit)
        for mx_index, host, port in route.hosts:
            if tried >= address_limit or sessions >= session_limit:
                limit = (f"{address_limit} addresses" if tried >= address_limit
                         else f"{session_limit} sessions")
                log.info("%s: %s: stopped after %s", envelope.get("id"), domain, limit)
                errors.append(TemporaryError.make("mx_limit", domain=domain, limit=limit))
                break
            states = [mx_state] if mx_state else []
            info.update({"server": host, "ip": None, "port": port, "mx_index": mx_index,
                         "dane": None})
            try:
                addresses, dane = await self._prepare_host(domain, policy, host, port, mx_state,
                                                           security, states,
                                                           literal=route.configured)
            except PermanentError as err:
                if route.implicit:
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
            if any(self.me.is_me(ip, port) for ip in addresses):
                # RFC 5321 §5.1: a host that is us, and every less preferred one, is out.
                # With nothing more preferred tried, the mail has nowhere to go but here.
                log.warning("%s: %s (%s port %d) of %s is this host", envelope.get("id"),
                            host, ", ".join(addresses), port, domain)
                if errors:
                    break
                raise PermanentError.make("loops", domain=domain)
            info["dane"] = _dane_label(dane, security, policy)
            host_policy = policy
            if sts is not None and dane is None:  # RFC 8461 §2: DANE takes precedence
                refusal = sts.refuse_host(host)
                if refusal is not None:
                    log.info("%s: %s", envelope.get("id"), refusal.text)
                    sts.fill(info)
                    errors.append(refusal)
                    continue
                host_policy = sts.tls_policy(policy)
            for ip in addresses:
                if tried >= address_limit or sessions >= session_limit:
                    break
                tried += 1
                info.update({"server": host, "ip": ip, "port": port, "mx_index": mx_index})
                try:
                    conn = await self._connection(domain, host_policy, host, ip, port, dane)
                except DeliveryError as err:
                    if not isinstance(err, ConnectFailure):
                        sessions += 1
                    deliveries.tls_failure(err)
                    log.info("%s: %s[%s]:%d for %s: %s", envelope.get("id"), host, ip, port,
                             domain, err)
                    if isinstance(err, DANEFailure):
                        info["dane"] = "failed"
                    if sts is not None and dane is None and isinstance(err, TLSPolicyFailure):
                        sts.failed(err.text)
                        sts.fill(info)
                    if _unreachable(err):
                        reach.failed += 1
                    else:
                        reach.reached = True
                    errors.append(err)
                    continue
                reach.reached = True
                sessions += 1
                info["tls"] = conn.tls
                if conn.dane is not None:
                    info["dane"] = conn.dane.status
                    if conn.dane.record is not None:
                        info["dane_match"] = conn.dane.description
                if sts is not None:
                    sts.connected(host, conn.tls is not None, conn.tls_failure,
                                  dane=conn.dane is not None, log_prefix=envelope.get("id"),
                                  unverified=conn.tls_verify_error)
                    sts.fill(info)
                # Whether NOTIFY/ORCPT went on: the next hop then owns success notices.
                info["dsn"] = conn.extensions.has("DSN")
                key: PoolKey = (conn.server, conn.ip, conn.port, host_policy, dane)
                try:
                    outcomes = await conn.deliver(envelope, rcpts, source)
                except StaleConnection as stale:
                    # A pooled connection reused without RSET had been closed: the server
                    # took nothing of this message. Once more, on a new connection.
                    log.info("%s: %s; delivering on a new connection", envelope.get("id"),
                             stale)
                    self.pool.release(conn, key)  # broken: closed
                    try:
                        conn = await self._connection(domain, host_policy, host, ip, port,
                                                      dane, pooled=False)
                    except DeliveryError as err:
                        log.info("%s: %s[%s]:%d for %s: %s", envelope.get("id"), host, ip,
                                 port, domain, err)
                        errors.append(err)
                        continue
                    info["tls"] = conn.tls
                    try:
                        outcomes = await conn.deliver(envelope, rcpts, source)
                    finally:
                        self.pool.release(conn, key)
                    return outcomes
                except BaseException:
                    self.pool.release(conn, key)
                    raise
                self.pool.release(conn, key)
                return outcomes
        raise _final_error(errors, domain)

    async def _prepare_host(self, domain: str, policy: TLSPolicy, host: str, port: int,
                            mx_state: str | None, security: RouteSecurity, states: list[str],
                            literal: bool = True
                            ) -> tuple[list[str], DaneRequirement | None]:
        """The addresses of ``host`` and what DANE demands of it; the DNSSEC state of each
        lookup is added to ``states``. Raises a DeliveryError when the host is unusable.
        ``literal=False`` (an MX exchange): a host spelled like an address is a name."""
        answer, state = await security.observe(
            host, "A/AAAA", self.resolver.lookup_addresses(host, literal=literal), states)
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
                          port: int, dane: DaneRequirement | None,
                          pooled: bool = True) -> SMTPConnection:
        """An idle connection to this server from the pool (``pooled``), or a new one."""
        key: PoolKey = (host, ip, port, policy, dane)
        conn = await self.pool.take(key) if pooled else None
        if conn is not None:
            return conn

        async def connect(try_tls: bool, verify_error: str | None = None) -> SMTPConnection:
            tls_policy = policy if verify_error is None else TLSPolicy(policy.mode, False)
            return await open_connection(
                server=host, ip=ip, port=port, helo=self.helo, domain=domain,
                policy=tls_policy, contexts=self.contexts, timeouts=self.delivery.timeouts,
                try_tls=try_tls, dane=dane, verify_error=verify_error)

        try:
            return await connect(True)
        except CertificateUnverified as err:
            if policy.mode != OPPORTUNISTIC or dane is not None:
                raise
            # RFC 7435: opportunistic means encrypted whenever offered; a certificate that
            # does not verify is recorded, never a reason to send in plain text.
            log.warning("%s[%s]:%d for %s: certificate not verified (%s); delivering over "
                        "TLS without verification (opportunistic TLS)", host, ip, port,
                        domain, err.reason)
            return await connect(True, verify_error=err.reason)
        except TLSHandshakeError as err:
            if policy.mode != OPPORTUNISTIC or dane is not None:
                raise
            # RFC 7435: a handshake that cannot complete must not stop delivery; plain it is.
            deliveries.tls_failure(err)
            log.warning("%s[%s]:%d for %s: %s; opportunistic TLS: retrying without TLS",
                        host, ip, port, domain, err.text)
            conn = await connect(False)
            conn.tls_failure = f"TLS handshake failed: {err.text}"
            return conn


def _dnssec_anywhere(delivery_cfg: DeliveryConfig) -> bool:
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

