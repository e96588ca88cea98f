"""Property tests on the sans-IO session.

Under the active implementation of ``empath._speedups``: random bytes into the session never
raise, every reply is a valid SMTP reply line (RFC 5321 §4.2: three digits, space or hyphen,
text, CRLF), and where the input is cut into chunks does not change the replies.

Differential (``test_twins_agree_*``): each generated input (command soup, random bytes, whole
transactions with DATA or BDAT content cut at random points, under random settings) goes
through one session whose command parser, path parser, DATA decoder and xtext decoder are the
Cython module's and through one whose are the pure-Python twin's; the replies, every event and
the session's state after every call must be identical. As in test_speedups.py, a missing build
fails the differential tests and only ``EMPATH_NO_EXTENSIONS=1`` skips them (with a reason).

Every property runs ``EMPATH_FUZZ_EXAMPLES`` examples (300 when unset); ``tools/fuzz`` sets it
for a long run (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import empath._speedups as pkg
from empath.smtp import session as S

NO_EXTENSIONS = os.environ.get("EMPATH_NO_EXTENSIONS", "") not in ("", "0")
BUILD_HINT = (
    "the Cython speedups are not built ({exc}); run `python setup.py build_ext --inplace`, "
    "or set EMPATH_NO_EXTENSIONS=1 to test the pure-Python twins only"
)
PROPS = settings(max_examples=int(os.environ.get("EMPATH_FUZZ_EXAMPLES") or 300), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REPLY = re.compile(rb"^[2-5][0-9][0-9][ -][\x20-\x7e\x80-\xff]*\r\n$")
COMMANDS = [b"EHLO x", b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@local.test>",
            b"DATA", b"BDAT 5", b"BDAT 3 LAST", b"RSET", b"NOOP", b"QUIT", b"VRFY x", b"HELP",
            b"STARTTLS", b".", b"MAIL FROM:<> SIZE=10 BODY=8BITMIME", b"RCPT TO:<x@y> NOTIFY=NEVER",
            b"MAIL FROM:<a@b.example> RET=HDRS ENVID=Q+2Bx+", b"MAIL FROM:<@r.example:a@[1.2.3.4]>",
            "MAIL FROM:<jö@b.example> SMTPUTF8".encode(), "RCPT TO:<ü@local.test>".encode(),
            b"RCPT TO:<c@local.test> ORCPT=rfc822;c+40local.test NOTIFY=SUCCESS,DELAY",
            b"RCPT TO:<postmaster>", b'RCPT TO:<"a b"@local.test>', b"AUTH PLAIN AGEAYg==",
            b"BDAT 0 LAST", b"rcpt to:<c@[IPv6:::1]>"]
SETTINGS = S.Settings(hostname="mx.test", local_domains=frozenset({"local.test"}),
                      tls_available=True, max_message_size=4096, max_errors=1000)
SPEEDUPS_IN_SESSION = ("split_command", "parse_path", "DataReader", "has_bare_eol")


# --------------------------------------------------------------------------- the driver


def state(session: S.ServerSession) -> tuple[Any, ...]:
    """What the session holds between calls, including its DATA decoder's counters."""
    reader = session._reader
    return (session.phase, session.helo, session.esmtp, session.tls_active, session.trusted,
            session.auth_user, repr(session.envelope), session.errors, session.commands,
            session._buf[session._pos:], session._chunk_left, session._chunk_size,
            None if reader is None else (reader.done, reader.size, reader.too_big,
                                         reader.bad_eol, reader.line_too_long))


def run(chunks: list[bytes], settings: S.Settings = SETTINGS
        ) -> tuple[list[bytes], list[Any]]:
    """Feed ``chunks``, then end of input, answering every pause as the server would when all
    goes well. Returns the reply lines and a log of every event (its repr at the time) and of
    the session's state after every call."""
    session = S.ServerSession(settings, trusted=False)
    out: list[bytes] = []
    log: list[Any] = []
    tls = []

    def handle(events: list[S.Event]) -> None:
        log.append(state(session))
        for ev in events:
            log.append(repr(ev))
            if isinstance(ev, S.Send):
                out.extend(ev.data.splitlines(keepends=True))
            elif isinstance(ev, S.DataEnd):
                handle(session.message_stored("QID"))
            elif isinstance(ev, S.Check):
                handle(session.check_done(None))
            elif isinstance(ev, S.Authenticate):
                handle(session.auth_done(ev.user, None))
            elif isinstance(ev, S.StartTLS):
                tls.append(True)

    handle(session.start())
    for chunk in chunks:
        if tls:
            break  # what follows STARTTLS belongs to the TLS handshake, not to the session
        handle(session.feed(chunk))
    handle(session.feed(b""))
    return out, log


def drive(chunks: list[bytes]) -> list[bytes]:
    return run(chunks)[0]


@contextmanager
def session_using(impl: SimpleNamespace) -> Iterator[None]:
    """The session module (and the xtext decoding of empath.smtp.params, which looks it up on
    the package at each call) calling ``impl``'s functions; restored on exit."""
    saved = [(S, name, getattr(S, name)) for name in SPEEDUPS_IN_SESSION]
    saved.append((pkg, "decode_xtext", pkg.decode_xtext))
    try:
        for name in SPEEDUPS_IN_SESSION:
            setattr(S, name, getattr(impl, name))
        pkg.decode_xtext = impl.decode_xtext
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _load(name: str) -> SimpleNamespace:
    try:
        return pkg.implementations()[name]
    except ImportError as exc:
        pytest.fail(BUILD_HINT.format(exc=exc), pytrace=False)


@pytest.fixture(scope="module")
def twins() -> tuple[SimpleNamespace, SimpleNamespace]:
    """(python, cython), for the tests that compare them."""
    if NO_EXTENSIONS:
        pytest.skip("EMPATH_NO_EXTENSIONS is set: the twins are not compared")
    return _load("python"), _load("cython")


def assert_twins_agree(twins: tuple[SimpleNamespace, SimpleNamespace], chunks: list[bytes],
                       settings: S.Settings = SETTINGS) -> list[bytes]:
    python, cython = twins
    with session_using(python):
        py_out, py_log = run(chunks, settings)
    with session_using(cython):
        cy_out, cy_log = run(chunks, settings)
    assert py_out == cy_out
    assert py_log == cy_log
    for line in py_out:
        assert REPLY.match(line), line
    return py_out


# --------------------------------------------------------------------------- strategies

command_lines = st.lists(st.tuples(st.sampled_from(COMMANDS), st.binary(max_size=20),
                                   st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
                         max_size=30).map(lambda parts: b"".join(a + b + c for a, b, c in parts))

TRANSACTIONS = [b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n",
                b"EHLO x\r\nMAIL FROM:<> BODY=8BITMIME\r\nRCPT TO:<c@local.test>\r\nDATA\r\n",
                b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@local.test>\r\nBDAT 7\r\n",
                b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n"]
# Mostly the octets that matter to the DATA decoder and the line splitter.
FRAGMENTS = [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bc", b"\r\n.", b"\r\n.\r\n", b".\r\n",
             b"x" * 40, b"\x00", b"\xff", b"\xc3\xa9", b"Subject: x\r\n"]
content = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=30), max_size=20)
pieces = st.one_of(st.sampled_from(TRANSACTIONS), st.sampled_from(FRAGMENTS),
                   st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"), st.binary(max_size=30))
# One transaction's worth: its commands, content, a terminator (or a broken or missing one),
# then anything (more commands, junk, the next transaction's pieces).
transactions = st.tuples(
    st.sampled_from(TRANSACTIONS) | pieces,
    content.map(b"".join),
    st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r", b""]),
    st.lists(pieces, max_size=4).map(b"".join),
).map(b"".join)


@st.composite
def dialogues(draw: st.DrawFn) -> list[bytes]:
    """A conversation (transactions, content, commands, junk) cut at random offsets."""
    data = b"".join(draw(st.lists(transactions, min_size=1, max_size=4)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


session_settings = st.builds(
    S.Settings,
    hostname=st.just("mx.test"),
    local_domains=st.just(frozenset({"local.test"})),
    max_message_size=st.sampled_from([16, 200, 4096, 4096]),
    max_recipients=st.sampled_from([1, 100]),
    max_line_length=st.sampled_from([8, 78, 1000]),
    max_command_line=st.sampled_from([40, 512]),
    max_errors=st.sampled_from([3, 1000]),
    bare_eol=st.sampled_from(["reject", "normalize"]),
    require_helo=st.booleans(),
    tls_available=st.booleans(),
    hooks=st.sampled_from([frozenset(), frozenset({"helo", "mail_from", "rcpt_to"})]),
    auth_offered=st.booleans(),
    auth_plaintext_ok=st.booleans(),
)


# --------------------------------------------------------------------------- properties


@PROPS
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_bytes(chunks: list[bytes]) -> None:
    for line in drive(chunks):
        assert REPLY.match(line), line


@PROPS
@given(command_lines)
def test_command_soup(data: bytes) -> None:
    whole = drive([data])
    for line in whole:
        assert REPLY.match(line), line
    # The same bytes split at every 7th octet give the same replies.
    assert drive([data[i:i + 7] for i in range(0, len(data), 7)]) == whole


# --------------------------------------------------------------------------- differential


def test_substitution_reaches_the_session(twins) -> None:
    """The differential tests really run each implementation: the session's DATA decoder is
    the one substituted, and the module is restored afterwards."""
    before = (S.split_command, S.parse_path, S.DataReader, pkg.decode_xtext)
    wire = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n"
    for impl in twins:
        with session_using(impl):
            session = S.ServerSession(SETTINGS, trusted=False)
            session.start()
            session.feed(wire)
            assert session.phase == S.DATA
            assert type(session._reader) is impl.DataReader
            assert S.parse_path is impl.parse_path and pkg.decode_xtext is impl.decode_xtext
    assert twins[0].DataReader is not twins[1].DataReader
    assert (S.split_command, S.parse_path, S.DataReader, pkg.decode_xtext) == before


@PROPS
@given(command_lines, st.integers(1, 16))
def test_twins_agree_on_command_soup(twins, data: bytes, step: int) -> None:
    assert_twins_agree(twins, [data])
    assert_twins_agree(twins, [data[i:i + step] for i in range(0, len(data), step)])


@PROPS
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_twins_agree_on_random_bytes(twins, chunks: list[bytes]) -> None:
    assert_twins_agree(twins, chunks)


@PROPS
@given(dialogues(), session_settings)
def test_twins_agree_on_dialogues(twins, chunks: list[bytes], settings: S.Settings) -> None:
    assert_twins_agree(twins, chunks, settings)
