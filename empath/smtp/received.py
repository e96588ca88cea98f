"""The ``Received:`` trace header Empath prepends to each message (RFC 5321 §4.4).

    Received: from <helo> ([<ip>])
            by <hostname> (Empath) with <protocol> id <queue id>
            (using <TLS version> with cipher <cipher>)
            for <recipient>; <date>

The protocol keyword is from RFC 3848 / RFC 6531 (SMTP, ESMTP, ESMTPS, UTF8SMTP, UTF8SMTPS);
``for`` is given only for a single recipient so that a Bcc list is not disclosed. The date is
formatted once per second, not per message.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


def protocol(esmtp: bool, tls: bool, utf8: bool, auth: bool = False) -> str:
    """RFC 3848 (ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 (UTF8SMTP...) keywords."""
    if utf8:
        base = "UTF8SMTP"
    elif not esmtp:
        return "SMTPS" if tls else "SMTP"
    else:
        base = "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def _clean(text: str) -> str:
    """Keep a client-supplied name from breaking the header (no CR/LF, no parentheses)."""
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text)[:255]


def received_header(session: Any, ip: str, hostname: str, queue_id: str,
                    tls: dict[str, str] | None, envelope: Any = None) -> bytes:
    env = envelope if envelope is not None else session.envelope
    helo = _clean(session.helo or "unknown")
    user = getattr(session, "auth_user", None)
    proto = protocol(session.esmtp, tls is not None, bool(env and env.smtputf8), user is not None)
    parts = [f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (Empath) with {proto} "
             f"id {queue_id}"]
    if tls is not None:
        parts.append(f"\r\n\t(using {tls.get('version', '')} with cipher "
                     f"{tls.get('cipher', '')})")
    if user is not None:
        parts.append(f"\r\n\t(authenticated as {_clean(user)})")
    if env is not None and len(env.recipients) == 1:
        parts.append(f"\r\n\tfor <{_clean(env.recipients[0]['address'])}>")
    parts.append(f"; {_date()}\r\n")
    return "".join(parts).encode("utf-8", "replace")
