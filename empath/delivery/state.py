"""Delivery state kept in the envelope: per-recipient status and the attempt history.

Pure functions over the envelope (``records.Envelope``, checked by ``records.parse_envelope``
when the file was read); no clocks (``now`` is passed in), no files. What they record is what
a restarted daemon and ``empathctl`` read back (docs/SPOOL.md, "Delivery state").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from empath.delivery.retry import retry_delay
from empath.spool import records

# Statuses and the open-recipient rule live with the record (empath/spool/records.py).
PENDING, DELIVERED, DEFERRED, FAILED, EXPIRED = (
    records.PENDING, records.DELIVERED, records.DEFERRED, records.FAILED, records.EXPIRED)
OPEN_STATUSES, CLOSED_STATUSES = records.OPEN_STATUSES, records.CLOSED_STATUSES
open_recipients, recipient_domain = records.open_recipients, records.recipient_domain
HISTORY_LIMIT = 100  # attempt records kept per message; the oldest are dropped first
# Why a deferred recipient expired (``recipients[].expired_by``).
BY_TIME, BY_ATTEMPTS = "message_expiration", "max_attempts"


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What one attempt did for one recipient."""

    status: str  # delivered | deferred | failed
    code: int | None
    enhanced: str | None
    text: str
    server: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the message goes after an attempt."""

    action: str  # "remove" | "defer" | "finished" (all closed, some failed/expired)
    next_retry_at: float | None = None


def route_for(address: str, routes: list[records.Route]) -> records.Route | None:
    """The route record of this attempt that carried ``address`` (routes are per domain)."""
    domain = recipient_domain(address) or "(local)"
    for route in routes:
        if str(route.get("domain", "")).lower() == domain:
            return route
    return None


def record_attempt(envelope: records.Envelope, outcomes: dict[str, RecipientOutcome],
                   info: records.AttemptInfo, now: float) -> None:
    """Apply one attempt's outcomes to the recipients and append it to the history.

    Besides the reply, ``last`` keeps how the recipient was carried (``transport``, and
    ``next_hop_dsn`` when the SMTP server offered DSN): a success notice depends on it
    (RFC 3461 §5.2.2, §6.2), and it must survive a crash between delivery and notice.
    """
    routes = info.get("routes") or []
    for rcpt in envelope["recipients"]:
        outcome = outcomes.get(rcpt["address"])
        if outcome is None or rcpt.get("status", PENDING) not in OPEN_STATUSES:
            continue
        rcpt["status"] = outcome.status
        rcpt["attempts"] = rcpt.get("attempts", 0) + 1
        last: records.LastResult = {"at": now, "code": outcome.code, "enhanced": outcome.enhanced,
                                "text": outcome.text, "server": outcome.server}
        route = route_for(rcpt["address"], routes)
        if route is not None:
            last["transport"] = route.get("transport")
            if route.get("dsn") is not None:
                last["next_hop_dsn"] = bool(route["dsn"])
        rcpt["last"] = last
    envelope["attempt_count"] = envelope.get("attempt_count", 0) + 1
    history = envelope.setdefault("attempts", [])
    history.append({
        "at": now,
        "number": envelope["attempt_count"],
        **info,
        "results": {addr: {"status": o.status, "code": o.code, "enhanced": o.enhanced,
                           "text": o.text, "server": o.server} for addr, o in outcomes.items()},
    })
    if len(history) > HISTORY_LIMIT:
        del history[: len(history) - HISTORY_LIMIT]


def decide(envelope: records.Envelope, now: float, *, max_attempts: int, base: float,
           maximum: float, jitter: float, expiration: float,
           rng: random.Random | None = None) -> Decision:
    """What to do with the message now that an attempt is recorded.

    Deferred recipients of a message past ``expiration`` or ``max_attempts`` become expired
    (``expired_by`` says which limit). The next retry never falls after the expiration time,
    so a message gets one last attempt when it expires rather than waiting past it.
    """
    queued_at = float(envelope.get("received_at", now))
    attempts = int(envelope.get("attempt_count", 0))
    still_open = open_recipients(envelope)
    if still_open:
        expired_by = (BY_TIME if now - queued_at >= expiration
                      else BY_ATTEMPTS if attempts >= max_attempts else None)
        if expired_by is not None:
            for rcpt in still_open:
                rcpt["status"] = EXPIRED
                rcpt["expired_by"] = expired_by
            still_open = []
    if still_open:
        delay = retry_delay(max(attempts, 1), base, maximum, jitter, rng or random.Random())
        due = min(now + delay, queued_at + expiration)
        envelope["next_retry_at"] = due
        return Decision("defer", due)
    envelope["next_retry_at"] = None
    if all(r.get("status") == DELIVERED for r in envelope["recipients"]):
        return Decision("remove")
    return Decision("finished")
