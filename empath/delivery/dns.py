"""MX and address resolution for remote delivery, with a TTL-respecting cache.

Owns: asking DNS (dnspython's ``dns.asyncresolver``, at the configured server and port, or the
system's) which hosts receive mail for a domain and at which addresses, and turning DNS
outcomes into delivery verdicts:

- MX records sorted by preference, equal preferences shuffled on every call (RFC 5321 §5.1:
  spread the load over equally preferred hosts);
- no MX records: the domain itself is the implicit MX (RFC 5321 §5.1);
- a null MX (RFC 7505: one MX of preference 0 pointing at ".") is a permanent 5.1.10 verdict
  reached without any connection;
- NXDOMAIN is permanent (5.1.2); SERVFAIL and timeouts are temporary (4.4.3).

DNSSEC (see ``dnssec.py`` for what the states mean): every query sets the AD bit (RFC 6840
§5.7), and every answer keeps whether the resolver validated it (``secure``: AD=1, on records
and on denials alike). When DNSSEC is consulted (``detect_bogus``), a SERVFAIL is asked once
more with checking disabled (CD, RFC 4035 §3.2.2): an answer then means the resolver's
validation failed, and the lookup raises ``DNSSECBogus`` (its data is never used).
``proven_insecure`` walks DS queries up from a name to tell an unsigned delegation the
resolver proved from an answer it merely did not validate. TLSA lookups (``lookup_tlsa``) are
for DANE (``dane.py``), TXT lookups (``lookup_txt``) for MTA-STS (``mtasts.py``).

Answers are cached for min(record TTL, ``dns.cache_ttl``), absent names and records for a short
negative TTL (RFC 2308: the zone's SOA says how long, capped at ``NEGATIVE_TTL_CAP``); failures
are not cached. The cache is bounded (least recently used out). Lookups are never serialized
behind a lock: concurrent lookups of one name share the single query already in flight.
Answers from the cache are counted (``empath_dns_cache_hits_total``) and each query is timed
(``empath_dns_lookup_seconds``, a bogus check's second query included).

Never connects to a mail server, never touches the spool.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from empath.config.typed import DeliveryDnsConfig
from empath.delivery.dane import TLSARecord
from empath.delivery.errors import DeliveryError, PermanentError, TemporaryError
from empath.observe import metrics, tracing

NEGATIVE_TTL_CAP = 60.0  # seconds an absent name/record is remembered at most
NEGATIVE_TTL_DEFAULT = 30.0  # when the response carries no SOA to say how long


@dataclass(frozen=True, slots=True)
class MXAnswer:
    """The mail hosts of a domain, most preferred first; ``implicit`` when the domain has no
    MX records and is its own mail host."""

    hosts: list[tuple[int, str]]
    implicit: bool = False
    secure: bool = False  # DNSSEC-validated (AD=1)


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    """The addresses of a host, IPv4 first; ``secure`` when every answer used was validated;
    ``literal`` when the host was an address and nothing was looked up."""

    addresses: list[str]
    secure: bool = False
    literal: bool = False


@dataclass(frozen=True, slots=True)
class TLSAAnswer:
    """The TLSA records at a name (none: NXDOMAIN or NODATA), and whether that was validated."""

    records: tuple[TLSARecord, ...]
    secure: bool = False


class DNSSECBogus(TemporaryError):
    """The resolver refused an answer that failed DNSSEC validation (SERVFAIL, while the same
    question with checking disabled was answered)."""

    dnssec = "bogus"


@dataclass(frozen=True, slots=True)
class _Records:
    """One cached DNS answer: the records (MX: (preference, host); A/AAAA: address text;
    TLSA: TLSARecord; DS: key tags; TXT: text), and whether the resolver validated it (AD)."""

    items: tuple[Any, ...]
    nxdomain: bool = False
    secure: bool = False


class _TTLCache:
    """A bounded mapping whose entries expire; least recently used entries go first."""

    def __init__(self, max_size: int, clock: Callable[[], float]) -> None:
        self.max_size = max_size
        self.clock = clock
        self._data: OrderedDict[tuple[str, str], tuple[float, _Records]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> _Records | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: _Records, ttl: float) -> None:
        if self.max_size <= 0 or ttl <= 0:
            return
        self._data[key] = (self.clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _normalize(name: str) -> str:
    return name.rstrip(".").lower()


def _negative_ttl(response: Any) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    for rrset in getattr(response, "authority", None) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


@functools.lru_cache(maxsize=1024)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build_resolver(dns_cfg: DeliveryDnsConfig) -> dns.asyncresolver.Resolver:
    """dnspython's async resolver for ``delivery.dns``: the configured server or the system's."""
    if dns_cfg.resolver is None:
        resolver = dns.asyncresolver.Resolver(configure=True)
    else:
        host, port = dns_cfg.resolver.host, dns_cfg.resolver.port
        if not _is_ip(host):
            # Once, at start-up: dnspython wants an address for its nameserver.
            host = str(socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0][4][0])
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.timeout = dns_cfg.timeout
    resolver.lifetime = dns_cfg.timeout
    resolver.cache = None  # ours respects cache_ttl and is bounded
    # RFC 6840 §5.7: AD in a query asks a validating resolver to say whether it validated.
    resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def _checking_disabled(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """A copy of ``resolver`` whose queries set CD: the resolver answers without validating."""
    clone = dns.asyncresolver.Resolver(configure=False)
    clone.nameservers = resolver.nameservers
    clone.port = resolver.port
    clone.timeout, clone.lifetime = resolver.timeout, resolver.lifetime
    clone.cache = None
    clone.flags = dns.flags.RD | dns.flags.CD
    return clone


class MXResolver:
    """Resolves MX hosts and their addresses; one per delivery worker."""

    def __init__(self, dns_cfg: DeliveryDnsConfig, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 resolver: dns.asyncresolver.Resolver | None = None,
                 detect_bogus: bool | None = None) -> None:
        self.detect_bogus = (getattr(dns_cfg, "dnssec", "off") != "off" if detect_bogus is None
                             else detect_bogus)
        self.timeout = float(dns_cfg.timeout)
        self.cache_ttl = float(dns_cfg.cache_ttl)
        self._resolver = resolver or build_resolver(dns_cfg)
        self._cache = _TTLCache(int(dns_cfg.cache_size), clock)
        self._inflight: dict[tuple[str, str], asyncio.Future[_Records]] = {}
        self._rng = rng or random.Random()
        self._unchecked: dns.asyncresolver.Resolver | None = None

    # -- public ---------------------------------------------------------------------------
    async def lookup_mx(self, domain: str) -> MXAnswer:
        """The mail hosts of ``domain``; raises PermanentError or TemporaryError."""
        domain = _normalize(domain)
        records = await self._lookup(domain, "MX")
        if records.nxdomain:
            raise PermanentError.make("nxdomain", domain=domain)
        if not records.items:  # RFC 5321 §5.1 implicit MX
            return MXAnswer([(0, domain)], implicit=True, secure=records.secure)
        real = [(pref, host) for pref, host in records.items if host != ""]
        if not real:
            # RFC 7505 §3: "." as the only exchange: no mail for this domain, do not try.
            raise PermanentError.make("null_mx", domain=domain)
        # RFC 5321 §5.1: lowest preference first; equal preferences in random order.
        keyed = sorted((pref, self._rng.random(), host) for pref, host in real)
        return MXAnswer([(pref, host) for pref, _, host in keyed], secure=records.secure)

    async def resolve_mx(self, domain: str) -> list[tuple[int, str]]:
        """``(preference, host)`` pairs of ``domain``, implicit MX included."""
        return (await self.lookup_mx(domain)).hosts

    async def resolve_addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host`` (an address literal is its own answer)."""
        return (await self.lookup_addresses(host)).addresses

    async def lookup_addresses(self, host: str, *, literal: bool = True) -> AddressAnswer:
        """IPv4 then IPv6 addresses of ``host``, and whether they were validated.

        ``literal=False`` for an MX exchange: a name spelled like an address (``127.0.0.1.``)
        is looked up as the name it is, never used as an address (as Postfix does).
        Raises PermanentError when the name has no address at all (NXDOMAIN, or neither A nor
        AAAA records), TemporaryError when a lookup failed and the other gave nothing.
        """
        if literal and _is_ip(host):
            return AddressAnswer([host], literal=True)
        host = _normalize(host)
        results = await asyncio.gather(self._lookup(host, "A"), self._lookup(host, "AAAA"),
                                       return_exceptions=True)
        addresses: list[str] = []
        answered: list[_Records] = []
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, _Records):
                addresses.extend(result.items)
                answered.append(result)
            elif isinstance(result, DeliveryError):
                failure = result
            elif isinstance(result, BaseException):
                raise result
        if addresses:
            # A bogus family is not hidden behind a good one: a forged denial must not pass.
            if isinstance(failure, DNSSECBogus):
                raise failure
            return AddressAnswer(addresses, secure=all(r.secure for r in answered))
        if failure is not None:
            raise failure
        if any(isinstance(r, _Records) and r.nxdomain for r in results):
            raise PermanentError.make("nxdomain", domain=host)
        raise PermanentError.make("no_address", domain=host)

    async def lookup_tlsa(self, name: str) -> TLSAAnswer:
        """The TLSA records at ``name`` (``_25._tcp.mx.example``); none when it has none."""
        records = await self._lookup(_normalize(name), "TLSA")
        return TLSAAnswer(tuple(records.items), secure=records.secure)

    async def lookup_txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each one's strings joined (RFC 7208 §3.3 style); none
        when the name or the records do not exist. For MTA-STS (``mtasts.py``)."""
        records = await self._lookup(_normalize(name), "TXT")
        return list(records.items)

    async def proven_insecure(self, name: str) -> bool | None:
        """Whether the resolver proves ``name`` unsigned: walking DS queries up from it (not
        to the root), the first validated answer decides: a denial (no DS: an unsigned
        delegation) is True, DS records (the zone is signed) False; no validated answer at
        all, or a failed query, is None (nothing proven: the resolver may not validate)."""
        labels = _normalize(name).split(".")
        for i in range(len(labels)):
            try:
                records = await self._lookup(".".join(labels[i:]), "DS")
            except DeliveryError:
                return None
            if records.secure:
                return not records.items
        return None

    def cached_entries(self) -> int:
        return len(self._cache)

    # -- internals ------------------------------------------------------------------------
    async def _lookup(self, name: str, rdtype: str) -> _Records:
        key = (name, rdtype)
        hit = self._cache.get(key)
        if hit is not None:
            metrics.current().dns_cache_hits.inc()
            return hit
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._query(name, rdtype))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._query_done(key, f))
        # shield: one caller giving up (its delivery was cancelled) must not cancel the query
        # the other callers wait for.
        return await asyncio.shield(future)

    def _query_done(self, key: tuple[str, str], future: asyncio.Future[_Records]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not reported

    @tracing.dns_lookup
    async def _query(self, name: str, rdtype: str) -> _Records:
        started = time.monotonic()
        try:
            return await self._ask(name, rdtype)
        finally:
            metrics.current().dns_duration.labels(rdtype).observe(time.monotonic() - started)

    async def _ask(self, name: str, rdtype: str) -> _Records:
        key = (name, rdtype)
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False,
                                                  lifetime=self.timeout,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            records = _Records((), nxdomain=True, secure=bool(
                responses and responses[0].flags & dns.flags.AD))
            ttl = _negative_ttl(responses[0]) if responses else NEGATIVE_TTL_DEFAULT
            self._cache.put(key, records, min(ttl, NEGATIVE_TTL_CAP, self.cache_ttl))
            return records
        except dns.exception.Timeout:
            raise TemporaryError.make("dns_temp", name=f"{name}/{rdtype}",
                                      reason="timed out") from None
        except dns.resolver.NoNameservers:
            if self.detect_bogus and await self._answers_unchecked(name, rdtype):
                raise DNSSECBogus.make("dnssec_bogus", name=f"{name}/{rdtype}") from None
            raise TemporaryError.make("dns_temp", name=f"{name}/{rdtype}",
                                      reason="server failure") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise TemporaryError.make("dns_temp", name=f"{name}/{rdtype}",
                                      reason=str(exc) or type(exc).__name__) from None
        secure = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            records = _Records((), secure=secure)
            ttl = min(_negative_ttl(answer.response), NEGATIVE_TTL_CAP)
        else:
            records = _Records(tuple(self._items(answer.rrset, rdtype)), secure=secure)
            ttl = float(answer.rrset.ttl)
        self._cache.put(key, records, min(ttl, self.cache_ttl))
        return records

    async def _answers_unchecked(self, name: str, rdtype: str) -> bool:
        """Whether the resolver answers ``name``/``rdtype`` with checking disabled: after a
        SERVFAIL, that means validation failed (bogus) rather than the servers."""
        if self._unchecked is None:
            self._unchecked = _checking_disabled(self._resolver)
        try:
            await self._unchecked.resolve(name, rdtype, search=False, lifetime=self.timeout,
                                          raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return True
        except (dns.exception.DNSException, OSError):
            return False
        return True

    @staticmethod
    def _items(rrset: Any, rdtype: str) -> list[Any]:
        if rdtype == "MX":
            # The null MX exchange "." becomes "" so lookup_mx can recognise it.
            return [(int(rd.preference), _normalize(rd.exchange.to_text())) for rd in rrset]
        if rdtype == "TLSA":
            return [TLSARecord(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
                    for rd in rrset]
        if rdtype == "DS":
            return [int(rd.key_tag) for rd in rrset]
        if rdtype == "TXT":
            return [b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset]
        return [rd.address for rd in rrset]
