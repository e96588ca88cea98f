"""What the test SMTP sink (``tests/support/sink.py``) can be told and what it records.

``Behaviour`` is everything a test can script (replies per command, extensions offered, TLS,
delays, a drop mid-DATA); ``PRESETS`` names common ones for the command line. The records
(``SessionRecord``, ``Command``, ``ReceivedMessage``) are what tests assert on. Plain data, no
I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ReplySpec = tuple[int, str]


@dataclass
class Behaviour:
    greeting: ReplySpec = (220, "sink.test ESMTP test sink")
    ehlo_reply: ReplySpec | None = None  # None: 250 with the extensions below
    helo_reply: ReplySpec = (250, "sink.test")
    pipelining: bool = True
    dsn: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    chunking: bool = True  # CHUNKING and BINARYMIME
    size: int | None = 0  # SIZE keyword: None not advertised, 0 no limit, n limit (enforced)
    tls_cert: str | None = None
    tls_key: str | None = None
    advertise_starttls: bool | None = None  # None: when a certificate is set
    starttls_reply: ReplySpec = (220, "2.0.0 ready to start TLS")
    starttls_inject: bytes = b""  # sent in plain right after the 220 (an injection attack)
    mail_reply: ReplySpec = (250, "2.1.0 sender OK")
    rcpt_default: ReplySpec = (250, "2.1.5 recipient OK")
    rcpt_replies: dict[str, ReplySpec] = field(default_factory=dict)  # lower-case address
    data_reply: ReplySpec = (354, "end data with <CR><LF>.<CR><LF>")
    final_reply: ReplySpec = (250, "2.0.0 queued as {n}")
    rset_reply: ReplySpec = (250, "2.0.0 reset")
    delay: float = 0.0  # before every reply
    final_delay: float = 0.0  # after the final dot, before its reply (a server that stalls)
    quit_delay: float | None = None  # before the QUIT reply; None: delay
    disconnect_after_data_bytes: int | None = None  # drop the connection mid-DATA
    after_final: bytes = b""  # sent raw right after the final reply (a stray reply, say)
    # Drop the connection, without a reply, at this session's n-th MAIL (0: never): a server
    # that closed an idle connection just as the client reused it.
    drop_at_mail: int = 0
    drop_reply: ReplySpec | None = None  # said before that drop (421, say); None: nothing

    @property
    def offers_starttls(self) -> bool:
        if self.advertise_starttls is not None:
            return self.advertise_starttls
        return self.tls_cert is not None

    def extensions(self, tls_active: bool) -> list[str]:
        words = []
        if self.size is not None:
            words.append(f"SIZE {self.size}" if self.size else "SIZE")
        for wanted, word in ((self.pipelining, "PIPELINING"), (self.eightbitmime, "8BITMIME"),
                             (self.dsn, "DSN"), (self.smtputf8, "SMTPUTF8"),
                             (self.chunking, "CHUNKING"), (self.chunking, "BINARYMIME")):
            if wanted:
                words.append(word)
        if self.offers_starttls and not tls_active:
            words.append("STARTTLS")
        return words


PRESETS: dict[str, Behaviour] = {
    "accept": Behaviour(),
    "reject-mail": Behaviour(mail_reply=(550, "5.7.1 sender rejected")),
    "tempfail-mail": Behaviour(mail_reply=(451, "4.7.1 try again later")),
    "tempfail": Behaviour(ehlo_reply=None, mail_reply=(451, "4.3.0 try later"),
                          rcpt_default=(451, "4.3.0 try later"),
                          data_reply=(451, "4.3.0 try later")),
    "greet-421": Behaviour(greeting=(421, "4.3.2 sink.test not available")),
    "greet-554": Behaviour(greeting=(554, "5.3.2 sink.test no SMTP service here")),
    "ehlo-421": Behaviour(ehlo_reply=(421, "4.3.2 closing")),
    "no-ehlo": Behaviour(ehlo_reply=(502, "5.5.2 EHLO not implemented")),
    "slow": Behaviour(delay=0.5),
    "disconnect-data": Behaviour(disconnect_after_data_bytes=1),
    "minimal": Behaviour(pipelining=False, dsn=False, smtputf8=False, eightbitmime=False,
                         chunking=False, size=None),
}


@dataclass
class Command:
    line: str
    batch: int  # which read() brought it: commands sharing a batch were pipelined
    tls: bool


@dataclass
class SessionRecord:
    id: int
    peer: Any
    commands: list[Command] = field(default_factory=list)
    tls: dict[str, str] | None = None
    dropped: bool = False
    closed: bool = False

    def verbs(self) -> list[str]:
        return [c.line.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]

    def batches(self) -> list[list[str]]:
        groups: dict[int, list[str]] = {}
        for c in self.commands:
            groups.setdefault(c.batch, []).append(c.line)
        return list(groups.values())


@dataclass
class ReceivedMessage:
    n: int
    session: int
    mail_from: str
    mail_params: str
    rcpts: list[tuple[str, str]]
    data: bytes
    tls: bool
    via: str  # DATA | BDAT

    @property
    def recipients(self) -> list[str]:
        return [addr for addr, _ in self.rcpts]


def split_path(arg: str) -> tuple[str, str]:
    """``FROM:<a@b> PARAMS`` -> ("a@b", "PARAMS")."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        addr, _, params = rest[1:].partition(">")
        return addr, params.strip()
    addr, _, params = rest.partition(" ")
    return addr, params.strip()


def unstuff(data: bytes) -> bytes:
    """Undo RFC 5321 §4.5.2 transparency: drop the first "." of every line that has one."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line
                        for line in data.split(b"\r\n"))
