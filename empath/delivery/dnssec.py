"""The DNSSEC state of the lookups behind one route, and what ``delivery.dns.dnssec`` makes of it.

Empath does not validate signatures itself: it asks its resolver (``delivery.dns.resolver``,
meant to be a validating resolver it can trust, such as a local unbound) and reads the AD bit of
each answer (RFC 4035 §3.2.3, RFC 6840 §5.7/§5.8). Each lookup is judged as:

- ``secure``: the answer (records, or their absence) came with AD=1;
- ``insecure``: AD=0, and the resolver *proves* the name unsigned: walking up from the name, the
  first DS answer it validates (AD=1) is a denial (an NSEC/NSEC3-proven unsigned delegation);
- ``unvalidated``: AD=0 without such a proof: the resolver does not validate, or the nearest
  validated DS says the zone is signed although this answer was not validated;
- ``bogus``: the resolver answered SERVFAIL, and the same question with checking disabled (CD)
  got an answer: validation failed (``dns.py`` raises ``DNSSECBogus``);
- ``off``: DNSSEC is not consulted (mode ``off``).

Modes (``delivery.dns.dnssec``, or the domain's ``dnssec``): ``off`` consults nothing and uses
no DANE; ``log`` judges every lookup and records the states in the attempt history, and uses
DANE where TLSA records are secure; ``enforce`` does the same and makes an ``unvalidated``
answer a temporary failure. "A domain that should be signed" is therefore every domain, unless
the resolver proves it is not: only a validated denial of DS lets an unvalidated answer
through. A ``bogus`` answer never carries data and is a temporary failure in every mode; it is
never retried without validation. A domain whose TLS policy is ``dane`` is judged at least
under ``log``, since DANE needs the states.

Never builds a query itself (``dns.py`` does) and never touches a socket.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, TypeVar

from empath.config.typed import DeliveryConfig
from empath.delivery.errors import DeliveryError, TemporaryError

OFF, LOG, ENFORCE = "off", "log", "enforce"
MODES = (OFF, LOG, ENFORCE)
SECURE, INSECURE, UNVALIDATED, BOGUS = "secure", "insecure", "unvalidated", "bogus"
NO_DNS = "no-dns"  # a route that needed no lookup (an address literal)
# Weakest first: the state of a route is the weakest state of the lookups it rests on.
_STRENGTH = {BOGUS: 0, UNVALIDATED: 1, INSECURE: 2, SECURE: 3}

T = TypeVar("T")


class _Resolver(Protocol):
    async def proven_insecure(self, name: str) -> bool | None: ...


def mode_for(delivery_cfg: DeliveryConfig, domain: str) -> str:
    """The DNSSEC mode for ``domain``: its own ``dnssec`` first, then ``delivery.dns``'s;
    at least ``log`` when its TLS policy is ``dane``."""
    mode = str(delivery_cfg.dns.dnssec)
    policy = delivery_cfg.tls.default_policy
    own = delivery_cfg.domains.get(domain.lower()) if delivery_cfg.domains else None
    if own is not None:
        if own.dnssec is not None:
            mode = str(own.dnssec)
        if own.tls is not None:
            policy = own.tls
    if mode == OFF and policy == "dane":
        return LOG
    return mode


def weakest(states: list[str]) -> str:
    known = [s for s in states if s in _STRENGTH]
    return min(known, key=_STRENGTH.__getitem__) if known else NO_DNS


class RouteSecurity:
    """The DNSSEC state of every lookup one delivery makes, judged under one mode.

    ``lookups`` maps ``name/TYPE`` to its state (the ``dnssec_lookups`` of the route record);
    ``observe`` wraps a lookup from ``dns.py`` (anything with a ``secure`` attribute)."""

    def __init__(self, resolver: _Resolver, mode: str) -> None:
        self.resolver = resolver
        self.mode = mode
        self.lookups: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.mode != OFF

    async def observe(self, name: str, rdtype: str, lookup: Awaitable[T],
                      states: list[str] | None = None) -> tuple[T, str]:
        """Run ``lookup``; its answer and state (also appended to ``states``, the lookups a
        route rests on). Under ``enforce`` an unvalidated answer raises TemporaryError; a
        bogus one is recorded and re-raised in every mode."""
        key = f"{name}/{rdtype}"
        try:
            answer = await lookup
        except DeliveryError as err:
            if getattr(err, "dnssec", None) == BOGUS and self.active:
                self._note(key, BOGUS, states)
            raise
        if getattr(answer, "literal", False):
            return answer, NO_DNS  # an address literal: nothing was looked up
        state = await self.judge(name, bool(getattr(answer, "secure", False)))
        if self.active:
            self._note(key, state, states)
        if self.mode == ENFORCE and state == UNVALIDATED:
            raise TemporaryError.make("dnssec_unvalidated", name=key)
        return answer, state

    def _note(self, key: str, state: str, states: list[str] | None) -> None:
        self.lookups[key] = state
        if states is not None:
            states.append(state)

    async def judge(self, name: str, secure: bool) -> str:
        if not self.active:
            return OFF
        if secure:
            return SECURE
        proof = await self.resolver.proven_insecure(name)
        return INSECURE if proof is True else UNVALIDATED

    def route_state(self, states: list[str]) -> str:
        """The state of a route resting on the lookups of ``states``."""
        return OFF if not self.active else weakest(states)
