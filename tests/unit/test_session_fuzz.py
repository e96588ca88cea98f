"""Property tests: random bytes into the session never raise, and every reply is a valid
SMTP reply line (RFC 5321 §4.2: three digits, space or hyphen, text, CRLF)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from empath.smtp import session as S

REPLY = re.compile(rb"^[2-5][0-9][0-9][ -][\x20-\x7e\x80-\xff]*\r\n$")
COMMANDS = [b"EHLO x", b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@local.test>",
            b"DATA", b"BDAT 5", b"BDAT 3 LAST", b"RSET", b"NOOP", b"QUIT", b"VRFY x", b"HELP",
            b"STARTTLS", b".", b"MAIL FROM:<> SIZE=10 BODY=8BITMIME", b"RCPT TO:<x@y> NOTIFY=NEVER"]
SETTINGS = S.Settings(hostname="mx.test", local_domains=frozenset({"local.test"}),
                      tls_available=True, max_message_size=4096, max_errors=1000)


def drive(chunks: list[bytes]) -> list[bytes]:
    session = S.ServerSession(SETTINGS, trusted=False)
    out: list[bytes] = []
    tls = []

    def handle(events: list[S.Event]) -> None:
        for ev in events:
            if isinstance(ev, S.Send):
                out.extend(ev.data.splitlines(keepends=True))
            elif isinstance(ev, S.DataEnd):
                handle(session.message_stored("QID"))
            elif isinstance(ev, S.Check):
                handle(session.check_done(None))
            elif isinstance(ev, S.StartTLS):
                tls.append(True)

    handle(session.start())
    for chunk in chunks:
        if tls:
            break  # what follows STARTTLS belongs to the TLS handshake, not to the session
        handle(session.feed(chunk))
    handle(session.feed(b""))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes(chunks: list[bytes]) -> None:
    for line in drive(chunks):
        assert REPLY.match(line), line


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(COMMANDS), st.binary(max_size=20),
                          st.sampled_from([b"\r\n", b"\n", b"\r", b""])), max_size=30))
def test_command_soup(parts: list[tuple[bytes, bytes, bytes]]) -> None:
    data = b"".join(cmd + junk + end for cmd, junk, end in parts)
    whole = drive([data])
    for line in whole:
        assert REPLY.match(line), line
    # The same bytes split at every 7th octet give the same replies.
    assert drive([data[i:i + 7] for i in range(0, len(data), 7)]) == whole
