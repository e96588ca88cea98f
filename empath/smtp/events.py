"""What the sans-IO session exchanges with the protocol layer: its settings, the events it
returns, and the envelope of a transaction. Plain data; no behaviour beyond formatting."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from empath.smtp.replies import Reply
from empath.spool.records import Params, Recipient, new_params


@dataclass(frozen=True)
class Settings:
    """What a session needs from the configuration (plain values, no config objects)."""

    hostname: str = "localhost"
    banner: str = "ESMTP Empath"
    max_message_size: int = 35_000_000
    max_recipients: int = 100
    max_line_length: int = 1000
    max_command_line: int = 512
    max_errors: int = 10
    bare_eol: str = "reject"
    hop_limit: int = 50  # Received: fields an incoming message may carry (a loop beyond)
    require_helo: bool = True
    tls_available: bool = False
    local_domains: frozenset[str] = frozenset({"localhost"})
    relay_domains: frozenset[str] = frozenset()
    # Local parts of local_domains accepted at RCPT (delivery/local.py KnownUsers); None: any.
    local_users: Container[str] | None = None
    hooks: frozenset[str] = frozenset()  # stages some module implements
    auth_offered: bool = False  # AUTH (RFC 4954) on this listener
    auth_required: bool = False  # MAIL needs a successful AUTH first (submission)
    auth_plaintext_ok: bool = False  # AUTH allowed without TLS
    require_sender_match: bool = False  # MAIL FROM must belong to the authenticated user


# -- events --------------------------------------------------------------------------------
@dataclass(slots=True)
class Send:
    data: bytes


@dataclass(slots=True)
class StartTLS:
    pass


@dataclass(slots=True)
class DataStart:
    """Message data follows; ``envelope`` is the transaction's (carried in the event, since
    the session may have finished or dropped the transaction by the time it is handled)."""

    envelope: Envelope | None = None


@dataclass(slots=True)
class Data:
    chunk: bytes


@dataclass(slots=True)
class DataEnd:
    envelope: Envelope


@dataclass(slots=True)
class DataAbort:
    """The message is dropped; ``reply`` is why, when its content was refused (size, bare
    CR/LF, long line, too many hops), None for a reset or disconnect."""

    reply: Reply | None = None


@dataclass(slots=True)
class Check:
    stage: str  # "helo" | "mail_from" | "rcpt_to"
    value: Any


@dataclass(slots=True)
class Close:
    pass


@dataclass(slots=True)
class Authenticate:
    """Credentials to check; the session waits for ``auth_done``."""

    user: str
    password: str = field(repr=False)


Event = (Send | StartTLS | DataStart | Data | DataEnd | DataAbort | Check | Close
         | Authenticate)


@dataclass
class Envelope:
    """One transaction: sender, recipients and their ESMTP parameters."""

    sender: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    body: str | None = None
    smtputf8: bool = False
    size: int | None = None
    ret: str | None = None
    envid: str | None = None

    def params(self) -> Params:
        return new_params(body=self.body, smtputf8=self.smtputf8, size=self.size,
                          ret=self.ret, envid=self.envid)


