"""Delivery status notifications (RFC 3464 reports, RFC 3461 rules, RFC 3462 container).

Pure: decides which recipients a notice is owed for (``due_notices``) and builds the bytes of
a multipart/report message from an envelope, the recipients to report on and the original
message; *sending* a notice (spooling it as a new message from the null sender) is the
worker's job. Header values that come from the network (addresses, diagnostic text) are
stripped of CR/LF so a hostile reply cannot inject headers into a notice, and any other
control character in them (NUL, ESC, C1, bidi overrides) is written as an escape (``\x1b``,
``\u202e``); a server's reply text arrives already made printable by the client's reply
parser. Every line of a notice is at most ``LINE_LIMIT`` (998) octets (RFC 5322 §2.1.1):
longer fields are folded, longer text lines wrapped. The original message is returned whole
(RET=FULL) only up to ``delivery.bounce_size_limit`` octets, otherwise its headers alone.

Which notices exist:

- failure ("failed"): recipients that failed or expired, unless their NOTIFY excludes FAILURE;
- delay ("delayed"): sent once per message by the worker after ``delivery.delay_warning``,
  for open recipients whose NOTIFY asks for DELAY (or has no NOTIFY);
- success: recipients delivered with NOTIFY=SUCCESS. ``Action: delivered`` when the message
  reached its final destination here (Maildir, LMTP), ``relayed`` when an SMTP next hop that
  does not offer DSN took it (RFC 3461 §6.2.2). A next hop that offers DSN was given NOTIFY
  and ORCPT and owns the notice from then on (RFC 3461 §5.2.2), so none is sent here.

No notice ever goes to the null sender: that is how bounce loops end.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from typing import Any

from empath.delivery.errors import REPLIES
from empath.delivery.state import BY_TIME, DELIVERED, EXPIRED, FAILED
from empath.spool import MessageSource
from empath.spool.records import Envelope, LastResult, Recipient

# RFC 3461 §4.1: absent NOTIFY means the MTA's default; like most MTAs, failures are reported
# and delays are reported too (RFC 3461 §4.1 allows DELAY by default).
DEFAULT_NOTIFY = ("FAILURE", "DELAY")
HEADERS_LIMIT = 64 * 1024  # RET=HDRS, or a huge message: return at most this much header text
BOUNCE_SIZE_LIMIT = 50000  # RET=FULL up to this size, then headers only (Postfix's default)
LINE_LIMIT = 998  # RFC 5322 §2.1.1: octets per line, CRLF excluded
FAILURE_NOTICE, SUCCESS_NOTICE = "failed", "success"  # the notices due_notices() returns

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_INTRO = {
    "failed": "Your message could not be delivered to one or more recipients.",
    "delayed": "Your message has not been delivered yet to one or more recipients.\r\n"
               "Delivery will be retried; you do not need to resend it.",
    "success": "Your message was delivered to the recipients listed below, or relayed to\r\n"
               "a system that does not send delivery notifications.",
}


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _clean(text: Any) -> str:
    """One line of text for a notice: CR/LF and runs of white space become one space, other
    characters that are not printable become escapes."""
    flat = " ".join(str(text).replace("\r", " ").replace("\n", " ").split())
    if flat.isprintable():
        return flat
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in flat)


def _fold(line: str, indent: str) -> list[str]:
    """``line`` as lines of at most LINE_LIMIT octets: broken at a space where one is near,
    else anywhere (never inside a UTF-8 sequence); each continuation starts with ``indent``
    (white space, so a header field stays one field)."""
    out: list[str] = []
    while len(line.encode()) > LINE_LIMIT:
        room = LINE_LIMIT - (len(indent.encode()) if out else 0)
        head = line.encode()[:room].decode("utf-8", "ignore")
        cut = head.rfind(" ", room // 2)
        if cut <= 0:
            cut = len(head)
        out.append((indent if out else "") + line[:cut])
        line = line[cut:].lstrip(" ")
    out.append((indent if out else "") + line)
    return out


def _within_limit(text: str, indent: str) -> str:
    """Every CRLF-separated line of ``text`` folded to LINE_LIMIT octets."""
    return "\r\n".join(part for line in text.split("\r\n") for part in _fold(line, indent))


def _template(text: str) -> re.Pattern[str]:
    parts = re.split(r"\{[a-z_]+\}", text)
    return re.compile(".*".join(re.escape(p) for p in parts) + r"\Z", re.S)


# Verdicts the delivery side reaches itself (errors.REPLIES): their code is not a server's
# reply, so the report gives them a local diagnostic type and no Remote-MTA.
_OWN_VERDICTS = [(code, enhanced, _template(text)) for code, enhanced, text in REPLIES.values()]
_LOCAL_SERVERS = (None, "", "maildir")


def wants(recipient: Recipient, kind: str) -> bool:
    """Whether this recipient's NOTIFY asks for a notice of ``kind`` (FAILURE, DELAY, SUCCESS)."""
    notify = recipient.get("notify")
    if not notify:
        return kind in DEFAULT_NOTIFY
    return kind in notify and "NEVER" not in notify


def should_report(envelope: Envelope) -> bool:
    """No notice about a message from the null sender: that is how bounce loops end."""
    return bool(envelope.get("sender"))


def success_action(recipient: Recipient) -> str | None:
    """The Action of a success notice for a delivered recipient; None when none is ours.

    SMTP: ``relayed`` to a next hop without DSN; nothing when it offered DSN (it received
    NOTIFY and ORCPT and reports from now on). Any other transport is final delivery.
    """
    last = recipient.get("last", {})
    if last.get("transport") == "smtp":
        return None if last.get("next_hop_dsn") else "relayed"
    return "delivered"


def due_notices(envelope: Envelope) -> dict[str, list[Recipient]]:
    """Recipients owed a failure or success notice that has not been sent yet.

    A recipient whose final status needs no notice (NOTIFY, the null sender, a DSN-capable
    next hop) is marked ``dsn: "none"`` here at once; the others are returned by kind and
    marked with ``mark_notified`` once their notice is durable in the spool.
    """
    due: dict[str, list[Recipient]] = {FAILURE_NOTICE: [], SUCCESS_NOTICE: []}
    reporting = should_report(envelope)
    for rcpt in envelope["recipients"]:
        if "dsn" in rcpt:
            continue
        status = rcpt.get("status")
        if status in (FAILED, EXPIRED):
            if reporting and wants(rcpt, "FAILURE"):
                due[FAILURE_NOTICE].append(rcpt)
            else:
                rcpt["dsn"] = "none"
        elif status == DELIVERED:
            if reporting and wants(rcpt, "SUCCESS") and success_action(rcpt):
                due[SUCCESS_NOTICE].append(rcpt)
            else:
                rcpt["dsn"] = "none"
    return {kind: rcpts for kind, rcpts in due.items() if rcpts}


def mark_notified(recipients: list[Recipient], kind: str) -> None:
    for rcpt in recipients:
        rcpt["dsn"] = "failed" if kind == FAILURE_NOTICE else success_action(rcpt) or "none"


def is_own_verdict(last: LastResult) -> bool:
    """True when a recipient's last result is this MTA's own verdict, not a server reply."""
    if last.get("server") in _LOCAL_SERVERS:
        return True
    code, enhanced, text = last.get("code"), last.get("enhanced"), str(last.get("text", ""))
    return any(code == c and enhanced == e and rx.match(text) for c, e, rx in _OWN_VERDICTS)


def _status_of(rcpt: Recipient, action: str) -> str:
    last = rcpt.get("last", {})
    enhanced = last.get("enhanced")
    if rcpt.get("status") == EXPIRED and (rcpt.get("expired_by") == BY_TIME
                                           or not str(enhanced or "").startswith("4.")):
        return "4.4.7"  # RFC 3463 X.4.7: delivery time expired
    if enhanced:
        return str(enhanced)
    code = last.get("code")
    if isinstance(code, int) and 200 <= code < 600:
        return f"{code // 100}.0.0"
    return {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")


def _remote_mta(last: LastResult) -> str | None:
    """The name of the server that replied: ``mx.example.com`` from ``mx.example.com``,
    ``mx.example.com[192.0.2.1]:25``, ``192.0.2.1:24`` or ``[2001:db8::1]:24``."""
    server = last.get("server")
    if not server or is_own_verdict(last):
        return None
    text = str(server)
    if text.startswith("["):
        return _clean(text[1:].partition("]")[0]) or None
    name = text.partition("[")[0]
    host, colon, port = name.rpartition(":")
    if colon and host and port.isdigit():
        name = host
    return _clean(name) or None


def _diagnostic(last: LastResult) -> str | None:
    text = _clean(last.get("text", ""))
    if last.get("code") and not is_own_verdict(last):
        # RFC 3464 §2.3.6: the server's reply, code first (RFC 3463 code included).
        enhanced = f"{last['enhanced']} " if last.get("enhanced") else ""
        return f"smtp;{last['code']} {enhanced}{text}".rstrip()
    return f"x-empath;{text}" if text else None


def _action_of(rcpt: Recipient, kind: str) -> str:
    if kind == SUCCESS_NOTICE:
        return success_action(rcpt) or "delivered"
    return kind


def _recipient_block(rcpt: Recipient, action: str, retry_until: float | None) -> str:
    lines = []
    orcpt = rcpt.get("orcpt")
    if orcpt:
        kind, _, addr = str(orcpt).partition(";")
        lines.append(f"Original-Recipient: {_clean(kind)};{_clean(addr)}")
    lines.append(f"Final-Recipient: rfc822;{_clean(rcpt['address'])}")
    lines.append(f"Action: {action}")
    lines.append(f"Status: {_status_of(rcpt, action)}")
    last = rcpt.get("last", {})
    remote = _remote_mta(last)
    if remote:
        lines.append(f"Remote-MTA: dns;{remote}")
    diagnostic = _diagnostic(last)
    if diagnostic:
        lines.append(f"Diagnostic-Code: {diagnostic}")
    if last.get("at"):
        lines.append(f"Last-Attempt-Date: {email.utils.formatdate(last['at'])}")
    if action == "delayed" and retry_until:
        lines.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until)}")
    return "\r\n".join(lines) + "\r\n"


def _human_line(rcpt: Recipient, action: str) -> str:
    last = rcpt.get("last", {})
    reason = _clean(last.get("text", "")) or action
    if rcpt.get("status") == EXPIRED:
        limit = ("it was too long in the queue" if rcpt.get("expired_by") == BY_TIME
                 else f"{rcpt.get('attempts', 0)} attempts")
        reason = f"gave up after {limit}; last error: {reason}"
    elif action == "relayed":
        return f"<{_clean(rcpt['address'])}>: relayed to {_remote_mta(last) or 'the next hop'}"
    return f"<{_clean(rcpt['address'])}>: {action}: {reason}"


def _original_part(source: MessageSource, full: bool, size_limit: int) -> tuple[str, bytes]:
    with open(source.path, "rb") as fh:
        fh.seek(source.offset)
        if full and source.length <= size_limit:
            return "message/rfc822", fh.read(source.length)
        head = fh.read(min(source.length, HEADERS_LIMIT))
    end = head.find(b"\r\n\r\n")
    headers = head[: end + 2] if end >= 0 else head
    return "text/rfc822-headers", headers


def build_report(envelope: Envelope, recipients: list[Recipient], kind: str,
                 source: MessageSource, *, hostname: str, now: float | None = None,
                 size_limit: int = BOUNCE_SIZE_LIMIT, retry_until: float | None = None
                 ) -> bytes:
    """The whole notice (headers and body, CRLF) about ``recipients``.

    ``kind`` is "failed", "delayed" or "success"; in a success notice each recipient's
    Action is ``delivered`` or ``relayed`` (``success_action``). The original message is
    returned whole only in a failure notice with RET=FULL (RFC 3461 §4.3); otherwise, and
    above ``size_limit`` octets, its headers. ``retry_until``: in a delay notice, when the
    message expires (Will-Retry-Until).
    """
    if kind not in _SUBJECTS:
        raise ValueError(f"unknown notice kind {kind!r}")
    now = time.time() if now is None else now
    boundary = f"{int(now)}.{os.urandom(6).hex()}/{hostname}"
    sender = _clean(envelope["sender"])
    actions = [(rcpt, _action_of(rcpt, kind)) for rcpt in recipients]
    human = f"This is the mail system at host {hostname}.\r\n\r\n{_INTRO[kind]}\r\n"
    for rcpt, action in actions:
        human += f"\r\n{_human_line(rcpt, action)}"
    human += "\r\n"
    params = envelope.get("params", {})
    per_message = [f"Reporting-MTA: dns;{hostname}"]
    if params.get("envid"):
        per_message.append(f"Original-Envelope-Id: {_clean(params['envid'])}")
    per_message.append(f"X-Empath-Queue-ID: {_clean(envelope['id'])}")
    if envelope.get("received_at"):
        per_message.append(f"Arrival-Date: {email.utils.formatdate(envelope['received_at'])}")
    status = "\r\n".join(per_message) + "\r\n"
    for rcpt, action in actions:
        status += "\r\n" + _recipient_block(rcpt, action, retry_until)
    full = (params.get("ret") or "").upper() == "FULL" and kind == "failed"
    ctype, original = _original_part(source, full, size_limit)
    if kind != "failed":
        description = "Message headers"
    elif ctype == "message/rfc822":
        description = "Undelivered message"
    else:
        description = "Undelivered message headers"
    human += ("\r\nYour message is attached below.\r\n" if ctype == "message/rfc822"
              else "\r\nThe headers of your message are attached below.\r\n")
    human = _within_limit(human, "  ")
    status = _within_limit(status, " ")
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {_SUBJECTS[kind]}\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Message-ID: <{_clean(envelope['id'])}.{kind}.{int(now)}@{hostname}>\r\n"
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
        f"Content-Description: {description}\r\n\r\n"
    ).encode("utf-8", "replace")
    tail = f"\r\n--{boundary}--\r\n".encode()
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    return head + original + tail
