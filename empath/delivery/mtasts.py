"""MTA-STS (RFC 8461): a domain's policy, where it comes from, and what it allows.

Owns:

- parsing the ``_mta-sts.<domain>`` TXT record (§3.1: exactly one record beginning with
  ``v=STSv1;``, with an ``id`` of 1 to 32 letters and digits; anything else means the domain
  has no MTA-STS) and the policy file (§3.2: ``version: STSv1``, ``mode`` enforce | testing |
  none, ``max_age`` seconds up to 31557600, one ``mx`` line per allowed MX pattern, required
  unless the mode is none; lines end in LF or CRLF; unknown fields are ignored, and of a field
  given twice other than ``mx`` the first counts);
- MX matching (§4.1): a pattern is a host name, or ``*.`` and a domain matching exactly one
  more label on the left (``*.example.com`` matches ``mx1.example.com``, neither
  ``example.com`` nor ``a.b.example.com``); case and a trailing dot do not matter;
- the policy cache (§5.1), one per delivery worker: a policy is kept for its ``max_age``; the
  TXT record is looked up on every use (the DNS cache answers most), and a policy is fetched
  only when none is cached or the record's id differs from the cached one. A cached policy
  stays in force while the TXT record is gone or its lookup fails, and when a new policy
  cannot be fetched (§5.1: only a newer valid policy or expiry replaces it). A failed fetch is
  not repeated for the same id for ``FETCH_RETRY`` seconds, so a broken policy host is not
  asked again for every message. Concurrent uses share one fetch. Bounded, least recently used
  out.

- what a policy demands of one delivery (``StsCheck``, §5): under ``enforce`` a host outside
  the policy is refused and the others are reached with ``MTA_STS_ENFORCE`` (STARTTLS and a
  certificate valid for the MX name); under ``testing`` the same checks only say what would
  have failed (logged, and recorded in the route), and delivery goes on unchanged. Its
  ``result`` is ``verified``, ``failed`` or ``dane`` (DANE took precedence for the host).

Fetching itself (HTTPS, aiohttp) is ``mtasts_fetch.py``'s; ``remote.py`` applies the checks.
This module never opens a connection and never touches the spool.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from empath.delivery.errors import DeliveryError, TemporaryError
from empath.delivery.tls import MTA_STS_ENFORCE, TLSPolicy
from empath.spool import records

log = logging.getLogger("empath.delivery.mtasts")

ENFORCE, TESTING, NONE = "enforce", "testing", "none"
MAX_AGE_LIMIT = 31557600  # §3.2: about a year
FETCH_RETRY = 300.0  # seconds before a failed fetch of one policy id is tried again
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_FIELD = re.compile(r"^([A-Za-z0-9_-]+):[ \t]*(.*?)[ \t]*$")


class PolicyError(ValueError):
    """A policy file that is not a valid MTA-STS policy; the text says why."""


@dataclass(frozen=True, slots=True)
class Policy:
    """One domain's MTA-STS policy."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def matches(self, host: str) -> bool:
        """Whether the MX host name ``host`` is one the policy allows (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def patterns(self) -> str:
        return ", ".join(self.mx) or "-"


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def mx_matches(pattern: str, host: str) -> bool:
    pattern, host = _norm(pattern), _norm(host)
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return bool(pattern) and host == pattern


def _valid_mx(value: str) -> bool:
    name = _norm(value)
    if name.startswith("*."):
        name = name[2:]
    labels = name.split(".")
    return len(labels) >= 2 and all(_LABEL.match(label) for label in labels)


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None: no (valid) MTA-STS record."""
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].split(";")[1:]:
        key, sep, value = part.strip().partition("=")
        if sep and key and key not in fields:
            fields[key] = value.strip()
    record_id = fields.get("id", "")
    return record_id if _ID.match(record_id) else None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """The policy in a policy file's text; PolicyError when it is not valid (§3.2)."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        match = _FIELD.match(line)
        if match is None:
            raise PolicyError(f"not a key: value line: {line[:60]!r}")
        key, value = match.groups()
        if key == "mx":
            if not _valid_mx(value):
                raise PolicyError(f"not an MX pattern: {value[:60]!r}")
            mx.append(_norm(value))
        elif key not in fields:
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in (ENFORCE, TESTING, NONE):
        raise PolicyError(f"mode is not enforce, testing or none: {mode!r}")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10):
        raise PolicyError(f"max_age is not a number of seconds: {age!r}")
    if not mx and mode != NONE:
        raise PolicyError("no mx line")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), policy_id)


@dataclass(slots=True)
class _Cached:
    policy: Policy
    expires: float


LookupTXT = Callable[[str], Awaitable[list[str]]]
Fetch = Callable[[str], Awaitable[str]]


class PolicyCache:
    """The MTA-STS policies of the domains one worker delivers to (see the module docstring).

    ``lookup_txt(name)`` returns the TXT strings at a name (none when it has none) or raises a
    DeliveryError; ``fetch(domain)`` returns the policy file's text or raises OSError or
    ValueError with the reason."""

    def __init__(self, lookup_txt: LookupTXT, fetch: Fetch, max_size: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lookup_txt = lookup_txt
        self.fetch = fetch
        self.max_size = max_size
        self.clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[Policy | None]] = {}
        self.fetches = 0  # policy fetches started (for tests and logs)

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for ``domain`` (mode none included), or None."""
        domain = _norm(domain)
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is not None and now >= cached.expires:
            del self._cache[domain]
            cached = None
        try:
            record_id = parse_txt(await self.lookup_txt(f"_mta-sts.{domain}"))
        except DeliveryError as err:
            log.info("MTA-STS: TXT lookup for %s failed: %s", domain, err)
            record_id = None
        if cached is not None:
            self._cache.move_to_end(domain)
            if record_id is None or record_id == cached.policy.id:
                return cached.policy
        if record_id is None:
            return None
        failed_until = self._failed.get((domain, record_id))
        if failed_until is not None and now < failed_until:
            return cached.policy if cached is not None else None
        key = (domain, record_id)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(domain, record_id))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._fetch_done(key, f))
        fresh = await asyncio.shield(future)
        if fresh is None:
            return cached.policy if cached is not None else None
        return fresh

    def _fetch_done(self, key: tuple[str, str], future: asyncio.Future[Policy | None]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not reported

    async def _fetch(self, domain: str, record_id: str) -> Policy | None:
        self.fetches += 1
        try:
            policy = parse_policy(await self.fetch(domain), record_id)
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            log.warning("MTA-STS: cannot fetch the policy of %s (id %s): %s; retried after "
                        "%gs", domain, record_id, exc or type(exc).__name__, FETCH_RETRY)
            self._failed[(domain, record_id)] = self.clock() + FETCH_RETRY
            while len(self._failed) > self.max_size:
                self._failed.popitem(last=False)
            return None
        log.info("MTA-STS: policy of %s (id %s): mode %s, mx %s, max_age %d", domain,
                 record_id, policy.mode, policy.patterns, policy.max_age)
        self._failed.pop((domain, record_id), None)
        if self.max_size > 0:
            self._cache[domain] = _Cached(policy, self.clock() + policy.max_age)
            self._cache.move_to_end(domain)
            while len(self._cache) > self.max_size:
                self._cache.popitem(last=False)
        return policy

    def cached(self, domain: str) -> Policy | None:
        entry = self._cache.get(_norm(domain))
        return entry.policy if entry is not None else None


class StsCheck:
    """What one delivery's policy (mode enforce or testing) demands, and what it found."""

    def __init__(self, domain: str, policy: Policy, verify: bool) -> None:
        self.domain = domain
        self.policy = policy
        self.verify = verify  # whether the domain's own TLS policy verifies certificates
        self.result: str | None = None
        self.failure: str | None = None

    @classmethod
    def of(cls, domain: str, policy: Policy | None, verify: bool) -> StsCheck | None:
        if policy is None or policy.mode == NONE:
            return None
        return cls(domain, policy, verify)

    @property
    def enforcing(self) -> bool:
        return self.policy.mode == ENFORCE

    def refuse_host(self, host: str) -> TemporaryError | None:
        """Under enforce, the error that excludes ``host`` (not in the policy); else None."""
        if not self.enforcing or self.policy.matches(host):
            return None
        err = TemporaryError.make("mta_sts_mx", server=host, domain=self.domain,
                                  patterns=self.policy.patterns)
        self.failed(err.text)
        return err

    def tls_policy(self, base: TLSPolicy) -> TLSPolicy:
        """The TLS policy for a host that passed ``refuse_host``."""
        return MTA_STS_ENFORCE if self.enforcing else base

    def failed(self, text: str) -> None:
        self.result, self.failure = "failed", text

    def connected(self, host: str, tls: bool, tls_failure: str | None, dane: bool,
                  log_prefix: Any = None, unverified: str | None = None) -> None:
        """The session with ``host`` is ready: judge it (under enforce it passed already)."""
        if dane:
            self.result, self.failure = "dane", None
            return
        if self.enforcing:
            self.result, self.failure = "verified", None
            return
        problems = []
        if not self.policy.matches(host):
            problems.append(f"MX host {host} is not in the policy (mx {self.policy.patterns})")
        if not tls:
            problems.append(f"no TLS with {host} ({tls_failure or 'not tried'})")
        elif not self.verify:
            problems.append(f"certificate of {host} not verified (accept_invalid_certs)")
        elif unverified is not None:
            problems.append(f"certificate of {host} did not verify ({unverified})")
        if not problems:
            self.result, self.failure = "verified", None
            return
        self.failed("; ".join(problems))
        log.warning("%s: MTA-STS policy of %s (mode testing) would refuse this delivery: %s; "
                    "delivering anyway", log_prefix, self.domain, self.failure)

    def fill(self, info: records.Route) -> None:
        """The ``mta_sts_result`` and ``mta_sts_failure`` of the route record."""
        info["mta_sts_result"] = self.result
        if self.failure:
            info["mta_sts_failure"] = self.failure
        else:
            info.pop("mta_sts_failure", None)
