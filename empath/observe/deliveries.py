"""What a delivery worker reports after each attempt and notice: metrics and audit records.

One call per attempt (``attempt_done``) after the worker has recorded the outcomes and
decided the message's fate: per recipient one attempt counted by result (``delivered``,
``deferred``, ``failed``, ``expired``) and by destination domain, and one audit record whose
event is the result (``bounced`` for a permanent failure); per route (one per destination
domain) its duration and, when it went over TLS, its TLS version. ``notice_spooled`` counts
a delivery status notification and records it. Deferred and bounced recipients are counted
by reason class (the subject of their enhanced code, ``metrics.REASON_CLASSES``).

The outbound SMTP code calls three small hooks as it works: ``remote_reply`` for every reply
a destination server sends (counted by code and enhanced code, and an event on the current
trace span), ``tls_failure`` for a TLS session that could not be had, and
``connection_opened`` for the gauge of open connections (its token is closed once, when the
connection is).

Everything comes from the route records the transports return (``server``, ``ip``, ``port``,
``tls``, ``duration``) and the recipients' ``last`` reply in the envelope: no transport is
asked anything. Pure bookkeeping: no clock, no file but the audit log's.
"""

from __future__ import annotations

from typing import Any

from empath.delivery.state import DEFERRED, EXPIRED, FAILED, recipient_domain, route_for
from empath.observe import metrics, tracing
from empath.observe.audit import AuditLog
from empath.observe.metrics import REASON_CLASSES, Instruments
from empath.spool.records import Envelope, Recipient, Route

AUDIT_EVENTS = {"delivered": "delivered", "deferred": "deferred", "failed": "bounced",
                "expired": "expired"}


def attempt_done(metrics: Instruments, audit: AuditLog, envelope: Envelope,
                 attempted: set[str], routes: list[Route]) -> None:
    """Report one attempt. ``attempted``: the recipients that were open when it began (so a
    recipient closed by an earlier attempt is not reported again)."""
    for route in routes:
        metrics.delivery_duration.labels(
            str(route.get("transport") or "smtp"),
            metrics.domain_label(str(route.get("domain") or "(local)"))).observe(
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
        if result in (DEFERRED, FAILED, EXPIRED):
            reason = reason_class(rcpt, result)
            (metrics.deferrals if result == DEFERRED else metrics.bounces)[reason].inc()
        if not audit.enabled:
            continue
        last = rcpt.get("last", {})
        route = route_for(address, routes) or Route()
        audit.write(
            AUDIT_EVENTS[result], envelope["id"], sender=envelope.get("sender"),
            recipient=address, destination=domain, attempt=number,
            transport=route.get("transport") or last.get("transport"),
            mx=route.get("server") or last.get("server"), ip=route.get("ip"),
            port=route.get("port"), tls=route.get("tls"), code=last.get("code"),
            enhanced=last.get("enhanced"), text=last.get("text"),
            duration=route.get("duration"),
            expired_by=rcpt.get("expired_by") if result == EXPIRED else None)


def notice_spooled(metrics: Instruments, audit: AuditLog, envelope: Envelope,
                   kind: str, notice_id: str, recipients: list[Recipient]) -> None:
    """A delivery status notification about ``recipients`` of ``envelope`` was spooled as
    message ``notice_id`` (to the original sender)."""
    counter = metrics.notices.get(kind)
    if counter is not None:
        counter.inc()
    if audit.enabled:
        audit.write("notice", envelope["id"], kind=kind, notice_id=notice_id,
                    sender=envelope.get("sender"),
                    recipients=[str(r.get("address")) for r in recipients])


def reason_class(rcpt: Recipient, result: str) -> str:
    """Why ``rcpt`` was deferred or bounced, as a bounded label (metrics.REASONS)."""
    if result == EXPIRED:
        return "expired"
    enhanced = (rcpt.get("last", {})).get("enhanced") or ""
    return REASON_CLASSES.get(enhanced.split(".")[1] if enhanced.count(".") == 2 else "",
                              "unspecified")


# -- hooks of the outbound SMTP code --------------------------------------------------------
def remote_reply(stage: str, code: int, enhanced: str | None) -> None:
    """A destination server replied ``code`` (``enhanced``) at ``stage`` of the session."""
    m = metrics.current()
    if m.enabled:
        labels = m.reply_labels(code, enhanced)
        m.remote_replies.labels(*labels).inc()
        if code >= 400:
            m.remote_errors.labels(labels[0]).inc()
    tracing.event("smtp.reply", stage, code, enhanced)


def tls_failure(err: Exception) -> None:
    """Count ``err`` when it says an outbound TLS session could not be had (other errors,
    a refused connection say, are not counted here)."""
    reason = tls_failure_reason(err)
    if reason is not None:
        metrics.current().tls_failures_out[reason].inc()


def tls_failure_reason(err: Exception) -> str | None:
    # Imported here: the delivery side imports this module.
    from empath.delivery.handshake import DANEFailure, TLSHandshakeError, TLSPolicyFailure

    if isinstance(err, DANEFailure):
        return "dane"
    if not isinstance(err, TLSPolicyFailure):
        return None
    text = str(err).lower()
    if not isinstance(err, TLSHandshakeError):
        return "refused" if "starttls refused" in text else "not_offered"
    if "certificate" in text or "verify" in text or "hostname" in text:
        return "certificate"
    return "timeout" if "timed out" in text else "handshake"


class _Open:
    """One open outbound connection in the gauge; ``close`` takes it out, once."""

    __slots__ = ("gauge",)

    def __init__(self, gauge: Any) -> None:
        self.gauge = gauge
        gauge.inc()

    def close(self) -> None:
        if self.gauge is not None:
            self.gauge.dec()
            self.gauge = None


class _Closed:
    __slots__ = ()

    def close(self) -> None:
        pass


_CLOSED = _Closed()


def connection_opened(server: str) -> _Open | _Closed:
    """Count a new connection to ``server``; close the token when the connection closes."""
    m = metrics.current()
    if not m.enabled:
        return _CLOSED
    return _Open(m.connections_out.labels(m.server_label(server)))
