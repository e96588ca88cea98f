"""The sans-IO SMTP session, driven by transcript files (tests/transcripts/*.smtp).

Transcript syntax, one directive per line:

    @ key=value        session settings (max_recipients=2, trusted=false, tls=true, auth=true...)
    > text             client line; CRLF appended; backslash escapes (\\r, \\n, \\x00) decoded
    >| text            client bytes exactly as written (escapes decoded, nothing appended)
    < text             one expected server reply line; a trailing * matches any rest
    = data text        the message stored last has exactly this content (escapes decoded)
    = stored N         N messages were stored in all
    = closed           the session closed the connection
    = tls              the session asked for STARTTLS (the driver completes the handshake)
    # comment

Consecutive client directives form one pipelined batch, fed in a single call; every batch is
also fed one byte at a time, and both feeds must produce identical replies and messages.
Stored messages get queue ids Q1, Q2, ...; a DataAbort discards the data. AUTH accepts
alice/secret and nothing else.
Every transcript runs against both the Cython speedups and their pure-Python twins.
"""

from __future__ import annotations

import codecs
import pathlib
import re

import pytest

from empath.delivery.local import KnownUsers
from empath.smtp import replies as R
from empath.smtp import session as S

TRANSCRIPTS = sorted((pathlib.Path(__file__).parent.parent / "transcripts").glob("*.smtp"))
REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -][^\r\n]*\r\n$")


def decode(text: str) -> bytes:
    return codecs.escape_decode(text.encode("utf-8"))[0]


class Driver:
    def __init__(self, settings: S.Settings, trusted: bool) -> None:
        self.session = S.ServerSession(settings, trusted=trusted)
        self.replies: list[bytes] = []
        self.stored: list[bytes] = []
        self.closed = False
        self.tls = False
        self.current: list[bytes] | None = None
        self.envelopes: list[S.Envelope] = []
        self.handle(self.session.start())

    def handle(self, events: list[S.Event]) -> None:
        for ev in events:
            if isinstance(ev, S.Send):
                self.replies.extend(ev.data.splitlines(keepends=True))
            elif isinstance(ev, S.DataStart):
                assert self.current is None
                self.current = []
            elif isinstance(ev, S.Data):
                assert self.current is not None
                self.current.append(ev.chunk)
            elif isinstance(ev, S.DataAbort):
                self.current = None
            elif isinstance(ev, S.DataEnd):
                assert self.current is not None
                self.stored.append(b"".join(self.current))
                self.envelopes.append(ev.envelope)
                self.current = None
                self.handle(self.session.message_stored(f"Q{len(self.stored)}"))
            elif isinstance(ev, S.Check):
                self.handle(self.session.check_done(None))
            elif isinstance(ev, S.Authenticate):
                ok = (ev.user, ev.password) == ("alice", "secret")
                self.handle(self.session.auth_done(ev.user, None if ok else R.AUTH_FAILED))
            elif isinstance(ev, S.StartTLS):
                self.tls = True
            elif isinstance(ev, S.Close):
                self.closed = True

    def feed(self, data: bytes, bytewise: bool) -> None:
        if bytewise:
            for i in range(len(data)):
                self.handle(self.session.feed(data[i:i + 1]))
                if self.tls and not self.session.tls_active:
                    break  # the rest of the batch would go to the TLS handshake
        else:
            self.handle(self.session.feed(data))


def parse_settings(lines: list[str]) -> tuple[S.Settings, bool]:
    kwargs: dict[str, object] = {"hostname": "mx.test", "local_domains": frozenset({"local.test"}),
                                 "relay_domains": frozenset({"relay.test"})}
    trusted = False
    for line in lines:
        if not line.startswith("@ "):
            continue
        for item in line[2:].split():
            key, _, value = item.partition("=")
            if key == "trusted":
                trusted = value == "true"
            elif key == "tls":
                kwargs["tls_available"] = value == "true"
            elif key == "auth":
                kwargs["auth_offered"] = kwargs["auth_required"] = value == "true"
            elif key in ("auth_plaintext_ok", "require_sender_match"):
                kwargs[key] = value == "true"
            elif key == "users":
                kwargs["local_users"] = KnownUsers(maildir=True,
                                                   listed=frozenset(value.split(",")))
            elif key in ("bare_eol", "hostname"):
                kwargs[key] = value
            elif key == "require_helo":
                kwargs[key] = value == "true"
            else:
                kwargs[key] = int(value)
    return S.Settings(**kwargs), trusted  # type: ignore[arg-type]


def run_transcript(path: pathlib.Path, bytewise: bool) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    settings, trusted = parse_settings(lines)
    d = Driver(settings, trusted)
    seen = 0
    batch = b""
    for number, line in enumerate(lines, 1):
        where = f"{path.name}:{number}"
        if line.startswith(">| "):
            batch += decode(line[3:])
            continue
        if line.startswith("> ") or line == ">":
            batch += decode(line[2:]) + b"\r\n"
            continue
        if batch:
            d.feed(batch, bytewise)
            batch = b""
        if line.startswith("< "):
            expected = line[2:]
            assert seen < len(d.replies), f"{where}: no reply, expected {expected!r}"
            got = d.replies[seen].decode("utf-8", "replace").rstrip("\r\n")
            seen += 1
            if expected.endswith("*"):
                assert got.startswith(expected[:-1]), f"{where}: got {got!r}"
            else:
                assert got == expected, f"{where}: got {got!r}"
        elif line.startswith("= data "):
            assert d.stored, f"{where}: nothing stored"
            assert d.stored[-1] == decode(line[7:]), f"{where}: stored {d.stored[-1]!r}"
        elif line.startswith("= stored "):
            assert len(d.stored) == int(line[9:]), f"{where}: stored {len(d.stored)}"
        elif line == "= closed":
            assert d.closed, f"{where}: session still open"
        elif line == "= tls":
            assert d.tls, f"{where}: no STARTTLS event"
            d.session.tls_established()
    if batch:
        d.feed(batch, bytewise)
    assert seen == len(d.replies), f"{path.name}: unexpected extra replies {d.replies[seen:]!r}"
    for reply in d.replies:
        assert REPLY_LINE.match(reply), f"{path.name}: malformed reply line {reply!r}"


@pytest.fixture(params=["python", "cython"])
def speedups_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the session against one implementation of the parsers."""
    from empath import _speedups

    impl = _speedups.implementations()[request.param]
    for name in ("split_command", "parse_path", "DataReader", "CommandSyntaxError"):
        monkeypatch.setattr(S, name, getattr(impl, name))
    monkeypatch.setattr(S.params, "_speedups", impl)
    monkeypatch.setattr(S.params, "CommandSyntaxError", impl.CommandSyntaxError)
    return str(request.param)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript(path: pathlib.Path, speedups_impl: str) -> None:
    run_transcript(path, bytewise=False)


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
def test_transcript_fed_bytewise(path: pathlib.Path, speedups_impl: str) -> None:
    run_transcript(path, bytewise=True)


def test_transcripts_exist() -> None:
    assert len(TRANSCRIPTS) >= 10


@pytest.mark.parametrize(("listeners", "policy", "stranger_known"), [
    (["127.0.0.1:25", "[::1]:25"], None, True),  # the embedded default: loopback only
    (["127.0.0.1:25", "192.0.2.1:25"], None, False),
    (["0.0.0.0:25"], None, False),
    (["0.0.0.0:25"], "accept", True),
    (["127.0.0.1:25"], "reject", False),
])
def test_unknown_users_are_rejected_unless_every_listener_is_loopback(
        tmp_path: pathlib.Path, listeners: list[str], policy: str | None,
        stranger_known: bool) -> None:
    import yaml

    from empath.config import load_config
    from empath.smtp.receiver import known_users

    (tmp_path / "mail" / "kate").mkdir(parents=True)
    conf = tmp_path / "empath.yaml"
    conf.write_text(yaml.safe_dump({
        "base_dir": str(tmp_path), "listeners": [{"address": a} for a in listeners],
        "local_delivery": {"maildir_root": str(tmp_path / "mail"), "unknown_users": policy}}))
    users = known_users(load_config(str(conf)))
    assert ("stranger" in users) is stranger_known
    assert "kate" in users and "root" in users and "postmaster" in users
    assert "bad%y" not in users and "\u212aate" not in users


HOPS_MESSAGE = (b"Received: a\r\nX-Received: not a hop\r\nrEcEiVeD: b\r\n\tfolded received: c\r\n"
                b"Subject: received: d\r\nRECEIVED:e\r\n\r\nReceived: in the body\r\n")


@pytest.mark.parametrize("limit", [1, 2, 3, 50])
def test_hop_counter_at_every_split(limit: int) -> None:
    """Three Received: fields in the header section, whatever pieces the message arrives
    in; look-alikes (X-Received, folded or in a value) and the body do not count."""
    from empath.smtp.content import HopCounter

    n = len(HOPS_MESSAGE)
    for i in range(n + 1):
        for j in range(i, n + 1):
            hops = HopCounter(limit)
            for piece in (HOPS_MESSAGE[:i], HOPS_MESSAGE[i:j], HOPS_MESSAGE[j:]):
                hops.feed(piece)
            assert hops.done, (i, j)
            assert hops.count == 3 if limit >= 3 else limit < hops.count <= 3, (i, j)
            assert hops.over is (limit < 3)
    empty = HopCounter(0)
    empty.feed(b"\r\nReceived: body only\r\n")
    assert empty.done and empty.count == 0
