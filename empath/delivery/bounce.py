"""Delivery status notifications (RFC 3464 reports, RFC 3461 rules, RFC 3462 container).

Pure: builds the bytes of a multipart/report message from an envelope, the recipients to report
on and the original message; deciding *when* to send one is the worker's job. Header values that
come from the network (addresses, diagnostic text) are stripped of CR/LF so a hostile reply
cannot inject headers into a bounce.
"""

from __future__ import annotations

import email.utils
import os
import time
from typing import Any

from empath.spool import MessageSource

# RFC 3461 §4.1: absent NOTIFY means the MTA's default; like most MTAs, failures are reported
# and delays are reported too (RFC 3461 §4.1 allows DELAY by default).
DEFAULT_NOTIFY = ("FAILURE", "DELAY")
HEADERS_LIMIT = 64 * 1024  # RET=HDRS, or a huge message: return at most this much header text
FULL_LIMIT = 10 * 1024 * 1024  # RET=FULL is honoured up to this size, then headers only


def _clean(text: str) -> str:
    return " ".join(str(text).replace("\r", " ").replace("\n", " ").split())


def wants(recipient: dict[str, Any], kind: str) -> bool:
    """Whether this recipient's NOTIFY asks for a notice of ``kind`` (FAILURE, DELAY, SUCCESS)."""
    notify = recipient.get("notify")
    if not notify:
        return kind in DEFAULT_NOTIFY
    return kind in notify and "NEVER" not in notify


def should_report(envelope: dict[str, Any]) -> bool:
    """No notice about a message from the null sender: that is how bounce loops end."""
    return bool(envelope.get("sender"))


def _status_of(rcpt: dict[str, Any], action: str) -> str:
    last = rcpt.get("last") or {}
    enhanced = last.get("enhanced")
    if enhanced:
        return str(enhanced)
    if action == "delayed":
        return "4.0.0"
    if rcpt.get("status") == "expired":
        return "4.4.7"  # RFC 3463: delivery time expired
    return "5.0.0" if action == "failed" else "2.0.0"


def _recipient_block(rcpt: dict[str, Any], action: str) -> str:
    lines = []
    orcpt = rcpt.get("orcpt")
    if orcpt:
        kind, _, addr = str(orcpt).partition(";")
        lines.append(f"Original-Recipient: {_clean(kind)};{_clean(addr)}")
    lines.append(f"Final-Recipient: rfc822;{_clean(rcpt['address'])}")
    lines.append(f"Action: {action}")
    lines.append(f"Status: {_status_of(rcpt, action)}")
    last = rcpt.get("last") or {}
    server = last.get("server")
    if server and server != "maildir":
        lines.append(f"Remote-MTA: dns;{_clean(server)}")
    if last.get("code"):
        lines.append(f"Diagnostic-Code: smtp;{last['code']} {_clean(last.get('text', ''))}")
    elif last.get("text"):
        lines.append(f"Diagnostic-Code: x-empath;{_clean(last['text'])}")
    if last.get("at"):
        lines.append(f"Last-Attempt-Date: {email.utils.formatdate(last['at'])}")
    if action == "delayed" and rcpt.get("will_retry_until"):
        lines.append(f"Will-Retry-Until: {email.utils.formatdate(rcpt['will_retry_until'])}")
    return "\r\n".join(lines) + "\r\n"


def _original_part(source: MessageSource, full: bool) -> tuple[str, bytes]:
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        if full and source.length <= FULL_LIMIT:
            return "message/rfc822", fh.read(source.length)
        head = fh.read(min(source.length, HEADERS_LIMIT))
    end = head.find(b"\r\n\r\n")
    headers = head[: end + 2] if end >= 0 else head
    return "text/rfc822-headers", headers


def build_report(envelope: dict[str, Any], recipients: list[dict[str, Any]], action: str,
                 source: MessageSource, *, hostname: str, now: float | None = None) -> bytes:
    """The whole notice (headers and body, CRLF) for ``recipients`` with the given Action.

    ``action`` is "failed", "delayed", "delivered" or "relayed" (RFC 3464 §2.3.3).
    """
    now = time.time() if now is None else now
    boundary = f"{int(now)}.{os.urandom(6).hex()}/{hostname}"
    subject = {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
        "delivered": "Successful Mail Delivery Report",
        "relayed": "Mail Relayed Report",
    }[action]
    sender = _clean(envelope["sender"])
    human = {
        "failed": "This is the mail system at host {h}.\r\n\r\nYour message could not be "
                  "delivered to one or more recipients. It is attached below.\r\n",
        "delayed": "This is the mail system at host {h}.\r\n\r\nYour message has not been "
                   "delivered yet to one or more recipients. Delivery will be retried; you "
                   "do not need to resend it.\r\n",
        "delivered": "This is the mail system at host {h}.\r\n\r\nYour message was "
                     "delivered to the recipients listed below.\r\n",
        "relayed": "This is the mail system at host {h}.\r\n\r\nYour message was relayed "
                   "to a system that does not send delivery notifications.\r\n",
    }[action].format(h=hostname)
    for rcpt in recipients:
        last = rcpt.get("last") or {}
        human += f"\r\n<{_clean(rcpt['address'])}>: {_clean(last.get('text', action))}"
    human += "\r\n"
    per_message = [f"Reporting-MTA: dns;{hostname}"]
    if envelope.get("params", {}).get("envid"):
        per_message.append(f"Original-Envelope-Id: {_clean(envelope['params']['envid'])}")
    per_message.append(f"X-Empath-Queue-ID: {envelope['id']}")
    if envelope.get("received_at"):
        per_message.append(f"Arrival-Date: {email.utils.formatdate(envelope['received_at'])}")
    status = "\r\n".join(per_message) + "\r\n"
    for rcpt in recipients:
        status += "\r\n" + _recipient_block(rcpt, action)
    full = (envelope.get("params", {}).get("ret") or "").upper() == "FULL" and action == "failed"
    ctype, original = _original_part(source, full)
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Message-ID: <{envelope['id']}.{action}.{int(now)}@{hostname}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n'
        f'\tboundary="{boundary}"\r\n'
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Description: Notification\r\n\r\n"
        f"{human}"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n"
        f"{status}"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Description: Undelivered message\r\n\r\n"
    ).encode("utf-8", "replace")
    tail = f"\r\n--{boundary}--\r\n".encode()
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    return head + original + tail
