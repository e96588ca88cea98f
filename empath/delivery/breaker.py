"""The per-destination circuit breaker of remote delivery (one per delivery worker).

Owns the decision whether to try a destination domain at all. After ``failures`` consecutive
deliveries to a domain that could not reach any of its servers (every connection refused,
timed out, closed before or at the greeting, or greeted with 4xx/5xx or refused EHLO) the
breaker *opens*: for ``cooldown`` seconds every delivery to the domain is deferred at once,
without a connection attempt (``451 4.4.1 ... (circuit breaker)``). Then exactly one delivery
is let through as a *probe* (others arriving meanwhile are still deferred): if it reaches a
server the breaker closes, if it fails the same way the breaker opens for another cooldown.

What counts: only connection-level failures. A server that answered (any reply to MAIL, RCPT
or DATA, a TLS or DANE failure after EHLO) is reachable, and closes the breaker; a delivery
that made no connection attempt (DNS failures, a policy that excluded every host) neither
counts nor closes. ``failures: 0`` turns the breaker off.

The state lives in one worker's memory: with M workers a dead destination costs up to M times
``failures`` attempts before every worker has stopped trying it, and each worker probes on its
own. That keeps workers independent (they share nothing but the spool) at the price of a few
extra connection attempts. Entries of domains that are fine are dropped; the table is bounded.

Fleet mode (``cluster.url``): a backend (``set_backend``; ``empath/cluster/fleet.py``) holds
each destination's breaker for every node together. A worker still counts failures itself;
when its breaker opens (or its probe fails) it opens the fleet's, for the cool-down, and a
delivery that reaches a server closes it. While the backend is usable its word decides
``check`` and ``admit``: open defers on every node without a connection attempt, and after the
cool-down exactly one delivery in the fleet probes. While it is not (Redis down) the local
breakers above decide alone.

Never opens a connection and never touches the spool; the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from empath.config.typed import DeliveryConfig
from empath.delivery.errors import TemporaryError
from empath.observe import metrics

log = logging.getLogger("empath.delivery.smtp")

ENTRIES_KEPT = 10000  # domains with failures remembered; closed ones are dropped first

# What one delivery says about its destination (``record``).
REACHED, UNREACHABLE, UNKNOWN = "reached", "unreachable", "unknown"
CLOSED, OPEN, PROBE = "closed", "open", "probe"


@dataclass
class _State:
    failures: int = 0  # consecutive unreachable deliveries
    open_until: float | None = None  # monotonic time; None while closed
    probing: bool = False


class CircuitOpen(TemporaryError):
    """The breaker of the destination is open: deferred without a connection attempt."""


class SharedBreakers(Protocol):
    """Breaker state held for a whole fleet of nodes (fleet mode's backend)."""

    def usable(self) -> bool:
        """Whether the fleet's state can be trusted now (else the local breakers decide)."""

    def verdict(self, domain: str, admitted: bool) -> tuple[str, float, int]:
        """``(state, seconds left, failures)``: CLOSED, OPEN, PROBE (this delivery is the
        fleet's probe) or "probing" (another one is); ``admitted``: asked inside the
        connection slot, whose acquisition brought the fleet's exact word."""

    def opened(self, domain: str, cooldown: float, failures: int) -> None:
        """This worker's breaker for ``domain`` opened (or its probe failed)."""

    def closed(self, domain: str) -> None:
        """A delivery to ``domain`` reached a server."""

    def probe_over(self, domain: str) -> None:
        """A probe ended with no word on the destination: another may probe."""


_backend: SharedBreakers | None = None


def set_backend(backend: SharedBreakers | None) -> None:
    """Install (or remove) the fleet's breaker state for this process."""
    global _backend
    _backend = backend


def _shared() -> SharedBreakers | None:
    backend = _backend
    return backend if backend is not None and backend.usable() else None


class CircuitBreakers:
    """The breakers of every destination domain one worker delivers to."""

    def __init__(self, delivery_cfg: DeliveryConfig, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.delivery = delivery_cfg
        self.clock = clock
        self.wall = wall
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._open = 0  # entries with open_until set (open, or waiting for their probe)
        self.openings = 0  # times a breaker went from closed to open
        self.metrics = metrics.current()  # the two breaker instruments follow every change

    def settings(self, domain: str) -> tuple[int, float]:
        """``(failures, cooldown)`` for ``domain``: its own settings, else the defaults."""
        base = self.delivery.circuit_breaker
        failures, cooldown = base.failures, base.cooldown
        own = (self.delivery.domains or {}).get(domain)
        if own is not None:
            if own.circuit_breaker.failures is not None:
                failures = own.circuit_breaker.failures
            if own.circuit_breaker.cooldown is not None:
                cooldown = own.circuit_breaker.cooldown
        return int(failures), float(cooldown)

    def state(self, domain: str) -> str:
        """closed, open (cooling down, or a probe is out) or probe (the next one probes)."""
        entry = self._states.get(domain)
        if entry is None or entry.open_until is None:
            return CLOSED
        if entry.probing or self.clock() < entry.open_until:
            return OPEN
        return PROBE

    def check(self, domain: str) -> None:
        """Raise CircuitOpen while the breaker of ``domain`` is open (before waiting for a
        connection slot: such a delivery is deferred at once)."""
        shared = _shared()
        if shared is not None:
            state, left, failures = shared.verdict(domain, admitted=False)
            if state == OPEN:
                raise self._shared_refusal(domain, state, left, failures)
            return
        entry = self._states.get(domain)
        if entry is not None and entry.open_until is not None:
            now = self.clock()
            if entry.probing or now < entry.open_until:
                raise self._refusal(domain, entry, now)

    def _shared_refusal(self, domain: str, state: str, left: float,
                        failures: int) -> CircuitOpen:
        entry = self._states.get(domain)
        failures = max(failures, entry.failures if entry is not None else 0)
        if state == OPEN:
            until = self.wall() + max(0.0, left)
            return CircuitOpen.make("circuit_open", domain=domain, failures=failures,
                                    until=time.strftime("%H:%M:%S", time.localtime(until)))
        return CircuitOpen.make("circuit_probing", domain=domain, failures=failures)

    def admit(self, domain: str) -> bool:
        """Let a delivery to ``domain`` go ahead: True when it is the probe. Raises
        CircuitOpen while the breaker is open (or another delivery is probing)."""
        shared = _shared()
        if shared is not None:
            state, left, failures = shared.verdict(domain, admitted=True)
            if state == PROBE:
                log.info("circuit breaker for %s: cool-down over, one probe delivery in the "
                         "fleet", domain)
                return True
            if state != CLOSED:
                raise self._shared_refusal(domain, state, left, failures)
            return False
        entry = self._states.get(domain)
        if entry is None or entry.open_until is None:
            return False
        now = self.clock()
        if entry.probing or now < entry.open_until:
            raise self._refusal(domain, entry, now)
        entry.probing = True
        log.info("circuit breaker for %s: cool-down over, one probe delivery", domain)
        return True

    def record(self, domain: str, outcome: str, probe: bool = False) -> None:
        """What a delivery admitted by ``admit`` found (REACHED, UNREACHABLE, UNKNOWN)."""
        entry = self._states.get(domain)
        shared = _backend
        if entry is not None and probe:
            entry.probing = False
        if outcome == REACHED:
            if shared is not None and (probe or (entry is not None and entry.open_until)):
                shared.closed(domain)
            if entry is not None:
                del self._states[domain]
                if entry.open_until is not None:
                    self._opened(-1)
                    log.warning("circuit breaker for %s closed: a server answered", domain)
            elif probe:
                log.warning("circuit breaker for %s closed: a server answered", domain)
            return
        if outcome != UNREACHABLE:
            if probe and shared is not None:
                shared.probe_over(domain)
            return
        threshold, cooldown = self.settings(domain)
        if threshold <= 0:
            return
        if entry is None:
            entry = self._states[domain] = _State()
            self._trim(keep=domain)
        self._states.move_to_end(domain)
        entry.failures += 1
        # In a fleet, a failure past the threshold while the fleet's breaker was closed (by
        # another node's probe) opens it again.
        again = (shared is not None and shared.usable() and entry.open_until is not None
                 and entry.failures >= threshold)
        if probe or again or (entry.open_until is None and entry.failures >= threshold):
            if entry.open_until is None:
                self._opened(1)
            entry.open_until = self.clock() + cooldown
            log.warning("circuit breaker for %s open: %d connection failures in a row; "
                        "deliveries deferred without trying for %gs", domain, entry.failures,
                        cooldown)
            if shared is not None:
                shared.opened(domain, cooldown, entry.failures)

    def _opened(self, change: int) -> None:
        """One breaker opened (+1) or closed or was dropped while open (-1)."""
        self._open += change
        self.metrics.breakers_open.inc(change)
        if change > 0:
            self.openings += 1
            self.metrics.breaker_openings.inc()

    def open_count(self) -> int:
        """Destinations whose breaker is open or waiting for its probe."""
        return self._open

    def _refusal(self, domain: str, entry: _State, now: float) -> CircuitOpen:
        if entry.probing:
            return CircuitOpen.make("circuit_probing", domain=domain, failures=entry.failures)
        until = self.wall() + max(0.0, (entry.open_until or now) - now)
        return CircuitOpen.make("circuit_open", domain=domain, failures=entry.failures,
                                until=time.strftime("%H:%M:%S", time.localtime(until)))

    def _trim(self, keep: str) -> None:
        """Keep the table bounded: closed entries (failures below the threshold) go first,
        oldest first; open ones only when there is nothing else to drop; never ``keep``, the
        entry being recorded."""
        if len(self._states) <= ENTRIES_KEPT:
            return
        closed = [d for d, s in self._states.items() if s.open_until is None]
        for domain in closed + list(self._states):
            if len(self._states) <= ENTRIES_KEPT:
                return
            if domain == keep:
                continue
            dropped = self._states.pop(domain, None)
            if dropped is not None and dropped.open_until is not None:
                self._opened(-1)
