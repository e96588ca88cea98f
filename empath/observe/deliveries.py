"""What a delivery worker reports after each attempt and notice: metrics and audit records.

One call per attempt (``attempt_done``) after the worker has recorded the outcomes and
decided the message's fate: per recipient one attempt counted by result (``delivered``,
``deferred``, ``failed``, ``expired``) and by destination domain, and one audit record whose
event is the result (``bounced`` for a permanent failure); per route (one per destination
domain) its duration and, when it went over TLS, its TLS version. ``notice_spooled`` counts
a delivery status notification and records it.

Everything comes from the route records the transports return (``server``, ``ip``, ``port``,
``tls``, ``duration``) and the recipients' ``last`` reply in the envelope: no transport is
asked anything. Pure bookkeeping: no clock, no file but the audit log's.
"""

from __future__ import annotations

from typing import Any

from empath.delivery.state import EXPIRED, recipient_domain, route_for
from empath.observe.audit import AuditLog
from empath.observe.metrics import Instruments

AUDIT_EVENTS = {"delivered": "delivered", "deferred": "deferred", "failed": "bounced",
                "expired": "expired"}


def attempt_done(metrics: Instruments, audit: AuditLog, envelope: dict[str, Any],
                 attempted: set[str], routes: list[dict[str, Any]]) -> None:
    """Report one attempt. ``attempted``: the recipients that were open when it began (so a
    recipient closed by an earlier attempt is not reported again)."""
    for route in routes:
        metrics.delivery_duration.labels(str(route.get("transport") or "smtp")).observe(
            float(route.get("duration") or 0.0))
        tls = route.get("tls")
        if isinstance(tls, dict) and tls.get("version"):
            metrics.tls_out.labels(str(tls["version"])).inc()
    number = envelope.get("attempt_count", 0)
    for rcpt in envelope["recipients"]:
        address = rcpt["address"]
        result = rcpt.get("status")
        if address not in attempted or result not in AUDIT_EVENTS:
            continue
        domain = recipient_domain(address) or "(local)"
        metrics.attempts[result].inc()
        metrics.domain_attempts.labels(metrics.domain_label(domain), result).inc()
        if not audit.enabled:
            continue
        last = rcpt.get("last") or {}
        route = route_for(address, routes) or {}
        audit.write(
            AUDIT_EVENTS[result], envelope["id"], sender=envelope.get("sender"),
            recipient=address, destination=domain, attempt=number,
            transport=route.get("transport") or last.get("transport"),
            mx=route.get("server") or last.get("server"), ip=route.get("ip"),
            port=route.get("port"), tls=route.get("tls"), code=last.get("code"),
            enhanced=last.get("enhanced"), text=last.get("text"),
            duration=route.get("duration"),
            expired_by=rcpt.get("expired_by") if result == EXPIRED else None)


def notice_spooled(metrics: Instruments, audit: AuditLog, envelope: dict[str, Any],
                   kind: str, notice_id: str, recipients: list[dict[str, Any]]) -> None:
    """A delivery status notification about ``recipients`` of ``envelope`` was spooled as
    message ``notice_id`` (to the original sender)."""
    counter = metrics.notices.get(kind)
    if counter is not None:
        counter.inc()
    if audit.enabled:
        audit.write("notice", envelope["id"], kind=kind, notice_id=notice_id,
                    sender=envelope.get("sender"),
                    recipients=[str(r.get("address")) for r in recipients])
