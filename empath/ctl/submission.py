"""Turning a locally submitted message into queue data and an envelope (``empath sendmail``).

Pure functions, no I/O: line endings to CRLF, the header block split into fields, recipients
taken from To/Cc/Bcc (``-t``), Bcc removed, From/Date/Message-ID added when missing, the
``Received:`` trace header, and the envelope in the receiver's format (docs/SPOOL.md) with
``client.listener = "sendmail"``. Bare names (no ``@``) get ``@`` and the local domain.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass, field

from empath.spool import records

RECIPIENT_HEADERS = ("to", "cc", "bcc")
RESENT_HEADERS = ("resent-to", "resent-cc", "resent-bcc")
_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")  # RFC 5322 §3.6.8 field name, then ":"
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>()\[\],;:\\\"]")


class SubmissionError(ValueError):
    """The message or its addresses cannot be queued; the text says why."""


@dataclass
class Header:
    name: str  # as written
    lines: list[bytes]  # raw lines without their line ending, continuation lines included

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        raw = b"".join(self.lines)  # unfolding: remove the line breaks only
        return raw.partition(b":")[2].decode("utf-8", "replace").strip()


@dataclass
class Message:
    headers: list[Header] = field(default_factory=list)
    body: bytes = b""  # LF line endings, as after normalize

    def get_all(self, *keys: str) -> list[str]:
        return [h.value for h in self.headers if h.key in keys]

    def has(self, key: str) -> bool:
        return any(h.key == key for h in self.headers)

    def remove(self, *keys: str) -> None:
        self.headers = [h for h in self.headers if h.key not in keys]

    def add(self, name: str, value: str) -> None:
        self.headers.append(Header(name, [f"{name}: {value}".encode()]))

    def to_bytes(self) -> bytes:
        """The message with CRLF line endings (docs/SPOOL.md: the data as on the wire)."""
        head = b"".join(line + b"\r\n" for h in self.headers for line in h.lines)
        body = self.body.replace(b"\n", b"\r\n")
        return head + b"\r\n" + body


def normalize(raw: bytes) -> bytes:
    """Every line ending (CRLF, bare LF, bare CR) as LF, and a final one."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data


def parse(raw: bytes) -> Message:
    """Split normalized data into header fields and body.

    A leading mbox ``From `` line is dropped. The header block ends at the first empty line, or
    at the first line that is neither a field nor a continuation (that line starts the body).
    """
    data = normalize(raw)
    lines = data.split(b"\n")[:-1] if data else []
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    msg = Message()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == b"":
            i += 1
            break
        if line[:1] in (b" ", b"\t") and msg.headers:
            msg.headers[-1].lines.append(line)
        elif _FIELD.match(line):
            msg.headers.append(Header(line.partition(b":")[0].decode("ascii"), [line]))
        else:
            break
        i += 1
    rest = lines[i:]
    msg.body = b"".join(line + b"\n" for line in rest)
    return msg


def header_recipients(msg: Message) -> list[str]:
    """Addresses of To/Cc/Bcc, or of Resent-To/Cc/Bcc when the message has Resent- fields
    (RFC 5322 §3.6.6: a resent message goes to the resent recipients)."""
    keys = RESENT_HEADERS if any(h.key.startswith("resent-") for h in msg.headers) \
        else RECIPIENT_HEADERS
    return [addr for _, addr in email.utils.getaddresses(msg.get_all(*keys)) if addr]


def split_addresses(arg: str) -> list[str]:
    """Command-line recipients: ``a@x``, ``a@x, b@y``, ``Name <a@x>``."""
    return [addr for _, addr in email.utils.getaddresses([arg]) if addr]


def qualify(address: str, domain: str) -> str:
    """``user`` -> ``user@domain``; anything else unchanged, after a sanity check."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, dom = address.rpartition("@")
    if not at:
        local, dom = address, domain
    if not local or not dom or _BAD_ADDRESS.search(local) or _BAD_ADDRESS.search(dom):
        raise SubmissionError(f"invalid address {address!r}")
    return f"{local}@{dom}"


def unique(addresses: list[str]) -> list[str]:
    """Drop repeats (the same address in any case), keeping the first spelling."""
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out


def complete_headers(msg: Message, *, sender: str, full_name: str | None, message_id: str,
                     hostname: str, date: str) -> None:
    """Add From:, Date: and Message-ID: when missing, as an MTA does for local submission
    (RFC 5322 §3.6 requires From and Date)."""
    if not msg.has("from"):
        msg.add("From", email.utils.formataddr((full_name or "", sender), "utf-8"))
    if not msg.has("date"):
        msg.add("Date", date)
    if not msg.has("message-id"):
        msg.add("Message-ID", f"<{message_id}@{hostname}>")


def received_header(*, hostname: str, uid: int, message_id: str, recipients: list[str],
                    date: str) -> bytes:
    """The trace header of a local submission, in the style of ``empath.smtp.received``."""
    text = (f"Received: by {hostname} (Empath, from userid {uid})\r\n"
            f"\twith local id {message_id}")
    if len(recipients) == 1:  # as for SMTP: a Bcc list is never disclosed
        text += f"\r\n\tfor <{recipients[0]}>"
    return (text + f"; {date}\r\n").encode("utf-8", "replace")


def envelope(*, message_id: str, sender: str, recipients: list[str], data: bytes,
             notify: list[str] | None, ret: str | None, envid: str | None, uid: int,
             user: str, now: float, listener: str = "sendmail") -> records.Envelope:
    """The envelope in the receiver's format (docs/SPOOL.md, "Envelope")."""
    utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
    eight_bit = not data.isascii()
    return records.new_envelope(
        message_id=message_id, sender=sender,
        recipients=[records.new_recipient(r, notify=notify) for r in recipients],
        params=records.new_params(body="8BITMIME" if eight_bit else "7BIT", smtputf8=utf8,
                                  ret=ret, envid=envid),
        client=records.new_client(listener=listener, uid=uid, user=user),
        received_at=now)
