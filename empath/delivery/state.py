"""Delivery state kept in the envelope: per-recipient status and the attempt history.

Pure functions over the envelope dict; no clocks (``now`` is passed in), no files. What they
record is what a restarted daemon and ``empathctl`` read back (docs/SPOOL.md, "Delivery state").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from empath.delivery.retry import retry_delay

PENDING, DELIVERED, DEFERRED, FAILED, EXPIRED = (
    "pending", "delivered", "deferred", "failed", "expired")
OPEN_STATUSES = (PENDING, DEFERRED)
HISTORY_LIMIT = 100  # attempt records kept per message; older ones are summarised by a count


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


def open_recipients(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in envelope["recipients"] if r.get("status", PENDING) in OPEN_STATUSES]


def record_attempt(envelope: dict[str, Any], outcomes: dict[str, RecipientOutcome],
                   info: dict[str, Any], now: float) -> None:
    """Apply one attempt's outcomes to the recipients and append it to the history."""
    for rcpt in envelope["recipients"]:
        outcome = outcomes.get(rcpt["address"])
        if outcome is None or rcpt.get("status", PENDING) not in OPEN_STATUSES:
            continue
        rcpt["status"] = outcome.status
        rcpt["attempts"] = rcpt.get("attempts", 0) + 1
        rcpt["last"] = {"at": now, "code": outcome.code, "enhanced": outcome.enhanced,
                        "text": outcome.text, "server": outcome.server}
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


def decide(envelope: dict[str, Any], now: float, *, max_attempts: int, base: float,
           maximum: float, jitter: float, expiration: float,
           rng: random.Random | None = None) -> Decision:
    """What to do with the message now that an attempt is recorded.

    Deferred recipients of a message past ``expiration`` or ``max_attempts`` become expired.
    """
    queued_at = float(envelope.get("received_at", now))
    attempts = int(envelope.get("attempt_count", 0))
    still_open = open_recipients(envelope)
    if still_open and (now - queued_at >= expiration or attempts >= max_attempts):
        for rcpt in still_open:
            rcpt["status"] = EXPIRED
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
