"""The delivery client's sans-IO core against the receiver's sans-IO session, in memory.

h11-style pair tests: ``handshake.Handshake`` and ``client.Transaction`` on one side,
``empath.smtp.session.ServerSession`` on the other, the client's bytes fed to the session and
the session's bytes fed to the client's ``ReplyChannel`` (as ``connection.py`` feeds it from
a socket), no sockets and no clock. A ``tamper`` function stands between the session's output
and the client: a man in the middle, or a server that behaves worse than ours (a refusing
greeting, a 421 mid-transaction, a reply injected after STARTTLS).

What is asserted is what the client decides: the commands it sends, the step it takes next
(``Command``, ``BeginTLS``, ``Ready``, ``Fail``, ``Reconnect``) and the verdict per recipient.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from empath.delivery.client import (
    QUIT,
    RSET,
    DotStuffer,
    Extensions,
    ProtocolError,
    ProtocolFailure,
    Reply,
    ReplyChannel,
    Transaction,
    bdat_command,
    check_chunk_reply,
    mail_command,
    outcomes_after_error,
    rcpt_command,
)
from empath.delivery.dane import VERIFIED, TLSARecord, requirement
from empath.delivery.errors import PermanentError, TemporaryError, error_for_reply
from empath.delivery.handshake import (
    BeginTLS,
    CertificateUnverified,
    Command,
    DANEFailure,
    Fail,
    Handshake,
    Ready,
    Reconnect,
    Step,
    TLSHandshakeError,
    TLSPolicyFailure,
)
from empath.delivery.state import DEFERRED, DELIVERED, FAILED, RecipientOutcome
from empath.delivery.tls import DISABLED, MTA_STS_ENFORCE, OPPORTUNISTIC, REQUIRED, TLSPolicy
from empath.smtp import session as S
from tests.support import certs

OPP = TLSPolicy(OPPORTUNISTIC, verify=True)
REQ = TLSPolicy(REQUIRED, verify=True)
OFF = TLSPolicy(DISABLED, verify=True)
EHLO = b"EHLO client.test\r\n"
HELO = b"HELO client.test\r\n"
STARTTLS = b"STARTTLS\r\n"


class Wire:
    """One in-memory connection: the client's ReplyChannel, a ServerSession, and between
    the session's output and the client an optional ``tamper`` (bytes in, bytes out)."""

    def __init__(self, tamper: Callable[[bytes], bytes] | None = None,
                 **settings: object) -> None:
        base: dict[str, object] = {"hostname": "mx.test", "local_domains": frozenset({"x.test"})}
        base.update(settings)
        self.server = S.ServerSession(S.Settings(**base))  # type: ignore[arg-type]
        self.tamper = tamper or (lambda data: data)
        self.channel = ReplyChannel()  # the greeting is the first reply asked for
        self.writes: list[bytes] = []
        self.stored: list[tuple[S.Envelope, bytes]] = []
        self.tls_started = 0
        self.closed = False
        self._data: list[bytes] = []
        self._handle(self.server.start())

    def _handle(self, events: list[S.Event]) -> None:
        for ev in events:
            if isinstance(ev, S.Send):
                try:
                    self.channel.feed(self.tamper(ev.data))
                except ProtocolError:
                    pass  # kept in channel.error, as connection._ChannelReader does
            elif isinstance(ev, S.StartTLS):
                self.tls_started += 1
            elif isinstance(ev, S.DataStart):
                self._data = []
            elif isinstance(ev, S.Data):
                self._data.append(ev.chunk)
            elif isinstance(ev, S.DataEnd):
                self.stored.append((ev.envelope, b"".join(self._data)))
                self._handle(self.server.message_stored(f"Q{len(self.stored)}"))
            elif isinstance(ev, S.Close):
                self.closed = True

    def send(self, data: bytes, replies: int = 1) -> None:
        """A write that asks for ``replies`` replies (0: message data)."""
        if replies:
            self.channel.expect(replies, data[:12].decode(errors="replace"))
        self.writes.append(data)
        self._handle(self.server.feed(data))

    def reply(self) -> Reply:
        reply = self.channel.next()
        assert reply is not None, "the server did not answer"
        return reply

    @property
    def unread(self) -> bool:
        return self.channel.pending or self.channel.error is not None


def drive(wire: Wire, hs: Handshake, *, chain: list[bytes] | None = None,
          tls_error: str | None = None, unverified: bool = False,
          began: list[BeginTLS] | None = None) -> Step:
    """What connection.SMTPConnection.handshake does, in memory: the handshake's commands
    go to the session, the replies back; ``BeginTLS`` succeeds (presenting ``chain``) unless
    ``tls_error`` says why it failed. Returns the step that ends the handshake."""
    step = hs.receive(wire.reply(), unread=wire.unread)
    for _ in range(8):  # a handshake is at most EHLO, HELO, STARTTLS, EHLO, HELO
        if isinstance(step, Command):
            assert hs.expecting == step.stage
            wire.send(step.command)
            step = hs.receive(wire.reply(), unread=wire.unread)
        elif isinstance(step, BeginTLS):
            if began is not None:
                began.append(step)
            if tls_error is not None:
                step = hs.tls_failed(tls_error, unverified=unverified)
            else:
                wire.server.tls_established()
                step = hs.tls_established(chain)
        else:
            return step
    raise AssertionError("the handshake did not end")


def handshake(policy: TLSPolicy = OPP, **options: object) -> Handshake:
    return Handshake("client.test", policy, server="mx.test", domain="x.test",
                     **options)  # type: ignore[arg-type]


def replace_reply(prefix: bytes, line: bytes) -> Callable[[bytes], bytes]:
    """A tamper that swaps the server's reply starting with ``prefix`` for ``line``."""
    def tamper(data: bytes) -> bytes:
        return line if data.startswith(prefix) else data
    return tamper


def error_of(step: Step) -> Exception:
    assert isinstance(step, Fail), step
    return step.error


# -- the greeting ---------------------------------------------------------------------------
def test_a_220_greeting_gets_ehlo_and_a_ready_session() -> None:
    wire, hs = Wire(), handshake(OFF)
    step = drive(wire, hs)
    assert isinstance(step, Ready) and wire.writes == [EHLO]
    assert step.extensions.has("PIPELINING") and step.extensions.has("CHUNKING")
    assert step.extensions.size_limit == 35_000_000
    assert hs.tls_failure is None and not hs.encrypted


@pytest.mark.parametrize(("greeting", "kind", "status"), [
    (b"421 4.3.2 mx.test service shutting down\r\n", TemporaryError, DEFERRED),
    (b"554 5.7.1 mx.test no mail from you\r\n", PermanentError, FAILED),
])
def test_a_refusing_greeting_ends_the_session_before_any_command(
        greeting: bytes, kind: type, status: str) -> None:
    wire = Wire(tamper=replace_reply(b"220 ", greeting))
    err = error_of(drive(wire, handshake()))
    assert type(err) is kind and wire.writes == []
    assert isinstance(err, TemporaryError | PermanentError)
    assert (err.code, err.server, err.outcome().status) == (int(greeting[:3]), "mx.test",
                                                            status)


def test_a_multiline_greeting_is_one_reply() -> None:
    wire = Wire(tamper=replace_reply(b"220 ", b"220-mx.test ESMTP\r\n220-no UCE\r\n"
                                              b"220 welcome\r\n"))
    assert isinstance(drive(wire, handshake(OFF)), Ready)
    assert wire.writes == [EHLO]


def test_a_garbage_greeting_is_a_protocol_error() -> None:
    wire = Wire(tamper=replace_reply(b"220 ", b"HTTP/1.1 400 Bad Request\r\n"))
    assert isinstance(wire.channel.error, ProtocolError)
    with pytest.raises(ProtocolError, match="malformed reply"):
        wire.channel.next()


def test_a_greeting_with_a_reply_nobody_asked_for_breaks_the_channel() -> None:
    wire = Wire(tamper=replace_reply(b"220 ", b"220 mx.test\r\n250 early\r\n"))
    assert wire.reply().code == 220  # in its turn, handed out
    with pytest.raises(ProtocolError, match="unexpected"):
        wire.send(EHLO)


# -- EHLO and HELO --------------------------------------------------------------------------
def test_ehlo_refused_falls_back_to_helo_and_a_lockstep_transaction() -> None:
    wire = Wire(tamper=replace_reply(b"250-mx.test greets",
                                     b"502 5.5.1 EHLO not implemented\r\n"))
    hs = handshake(OPP)
    step = drive(wire, hs)
    assert wire.writes == [EHLO, HELO]
    assert isinstance(step, Ready) and step.extensions == Extensions()
    assert hs.tls_failure == "STARTTLS not offered"  # HELO offers nothing
    txn = Transaction(b"MAIL FROM:<s@a.test>\r\n", [("u@x.test", b"RCPT TO:<u@x.test>\r\n")],
                      pipelining=step.extensions.has("PIPELINING"))
    out = transact(wire, txn, b"Subject: x\r\n\r\nhi\r\n")
    assert out["u@x.test"].status == DELIVERED
    assert wire.writes[2:5] == [b"MAIL FROM:<s@a.test>\r\n", b"RCPT TO:<u@x.test>\r\n",
                                b"DATA\r\n"]  # one command per write without PIPELINING


def test_ehlo_answered_421_is_not_retried_with_helo() -> None:
    wire = Wire(tamper=replace_reply(b"250-mx.test greets",
                                     b"421 4.7.0 mx.test too busy\r\n"))
    err = error_of(drive(wire, handshake()))
    assert isinstance(err, TemporaryError) and err.code == 421
    assert wire.writes == [EHLO]


def test_helo_refused_too_is_the_servers_verdict() -> None:
    def tamper(data: bytes) -> bytes:
        if data.startswith(b"250-mx.test greets"):
            return b"550 5.7.1 go away\r\n"
        if data.startswith(b"250 mx.test greets"):
            return b"554 5.7.1 not you either\r\n"
        return data
    wire = Wire(tamper=tamper)
    err = error_of(drive(wire, handshake()))
    assert isinstance(err, PermanentError) and (err.code, err.text) == (554, "not you either")
    assert wire.writes == [EHLO, HELO]


def test_helo_session_under_required_tls_fails_for_want_of_starttls() -> None:
    wire = Wire(tamper=replace_reply(b"250-mx.test greets", b"500 5.5.2 what?\r\n"),
                tls_available=True)
    err = error_of(drive(wire, handshake(REQ)))
    assert isinstance(err, TLSPolicyFailure) and not isinstance(err, TLSHandshakeError)
    assert (err.code, err.enhanced) == (451, "4.7.4") and "x.test" in err.text


# -- STARTTLS per policy ----------------------------------------------------------------------
def test_opportunistic_starttls_then_ehlo_again_over_tls() -> None:
    wire, hs = Wire(tls_available=True), handshake(OPP)
    began: list[BeginTLS] = []
    step = drive(wire, hs, began=began)
    assert wire.writes == [EHLO, STARTTLS, EHLO] and wire.tls_started == 1
    assert began == [BeginTLS(dane=False, anchors=(), verify=True, warn_unverified=False)]
    assert isinstance(step, Ready) and hs.encrypted and hs.tls_failure is None
    assert not step.extensions.has("STARTTLS")  # the extensions of the EHLO over TLS
    assert hs.tls_notes == {"verified": "yes"}


def test_extensions_from_before_tls_are_forgotten() -> None:
    """RFC 3207 §4.2: a server that offers AUTH only over TLS; what the client uses is what
    the second EHLO said, not the first."""
    first: list[bytes] = []

    def strip_pipelining(data: bytes) -> bytes:
        if b"STARTTLS" not in data:
            return data
        first.append(data)
        return data.replace(b"250-PIPELINING\r\n", b"")
    wire = Wire(tamper=strip_pipelining, tls_available=True, auth_offered=True)
    step = drive(wire, handshake(OPP))
    assert isinstance(step, Ready) and len(first) == 1 and b"AUTH" not in first[0]
    assert step.extensions.has("AUTH") and step.extensions.has("PIPELINING")
    assert not step.extensions.has("STARTTLS")


@pytest.mark.parametrize(("policy", "try_tls"), [(OFF, True), (OPP, False)])
def test_no_starttls_when_tls_is_off_or_the_plain_retry(policy: TLSPolicy,
                                                        try_tls: bool) -> None:
    wire, hs = Wire(tls_available=True), handshake(policy, try_tls=try_tls)
    step = drive(wire, hs)
    assert isinstance(step, Ready) and step.extensions.has("STARTTLS")
    assert wire.writes == [EHLO] and wire.tls_started == 0 and hs.tls_failure is None


def test_opportunistic_without_starttls_goes_on_in_plain() -> None:
    wire, hs = Wire(), handshake(OPP)
    assert isinstance(drive(wire, hs), Ready)
    assert wire.writes == [EHLO] and hs.tls_failure == "STARTTLS not offered"


@pytest.mark.parametrize(("policy", "dane", "kind", "words"), [
    (REQ, False, TLSPolicyFailure, "TLS is required for x.test"),
    (MTA_STS_ENFORCE, False, TLSPolicyFailure, "MTA-STS policy of x.test"),
    (OPP, True, DANEFailure, "DNSSEC-validated TLSA records"),
    (OFF, True, DANEFailure, "DNSSEC-validated TLSA records"),  # DANE whatever the policy
])
def test_starttls_not_offered_fails_where_tls_is_mandatory(
        policy: TLSPolicy, dane: bool, kind: type, words: str) -> None:
    wire = Wire()
    err = error_of(drive(wire, handshake(policy, dane=DANE_EE if dane else None)))
    assert type(err) is kind and words in str(err)
    assert isinstance(err, TemporaryError) and err.enhanced == "4.7.4"
    assert wire.writes == [EHLO]  # not a byte of mail in plain text


def offer_starttls(data: bytes) -> bytes:
    """A server that advertises STARTTLS it cannot do (ServerSession answers 454)."""
    return data.replace(b"250-ENHANCEDSTATUSCODES\r\n",
                        b"250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n")


@pytest.mark.parametrize(("policy", "dane", "kind", "words"), [
    (REQ, False, TLSPolicyFailure, "TLS is required for x.test"),
    (MTA_STS_ENFORCE, False, TLSPolicyFailure, "MTA-STS policy of x.test"),
    (OPP, True, DANEFailure, "DANE TLS with mx.test failed")])
def test_starttls_answered_454_fails_where_tls_is_mandatory(policy: TLSPolicy, dane: bool,
                                                            kind: type, words: str) -> None:
    wire = Wire(tamper=offer_starttls)
    err = error_of(drive(wire, handshake(policy, dane=DANE_EE if dane else None)))
    assert type(err) is kind and "STARTTLS refused: 454 4.7.0 TLS not available" in str(err)
    assert words in str(err) and isinstance(err, TemporaryError) and err.enhanced == "4.7.5"
    assert wire.writes == [EHLO, STARTTLS]


def test_starttls_answered_454_under_opportunistic_goes_on_in_plain() -> None:
    wire, hs = Wire(tamper=offer_starttls), handshake(OPP)
    step = drive(wire, hs)
    assert isinstance(step, Ready) and step.extensions.has("STARTTLS")  # pre-TLS keywords
    assert hs.tls_failure == "STARTTLS refused: 454 4.7.0 TLS not available"
    assert not hs.encrypted and wire.tls_started == 0
    txn = Transaction(b"MAIL FROM:<s@a.test>\r\n", [("u@x.test", b"RCPT TO:<u@x.test>\r\n")],
                      pipelining=True)
    assert transact(wire, txn, b"hi\r\n")["u@x.test"].status == DELIVERED


@pytest.mark.parametrize("policy", [OPP, REQ])
def test_starttls_answered_421_ends_the_session_under_every_policy(policy: TLSPolicy) -> None:
    """421 says the server is closing the channel (RFC 5321 §3.8): no plain-text session
    follows, even under opportunistic TLS; the error is the server's, so the next MX is
    tried."""
    def closing(data: bytes) -> bytes:
        data = offer_starttls(data)
        return data.replace(b"454 4.7.0 TLS not available", b"421 4.3.2 shutting down")
    wire = Wire(tamper=closing)
    err = error_of(drive(wire, handshake(policy)))
    assert type(err) is TemporaryError and err.code == 421 and "shutting down" in str(err)
    assert wire.writes == [EHLO, STARTTLS]  # nothing sent after the 421


@pytest.mark.parametrize("injected", [b"250 2.0.0 injected\r\n", b"250-PIPELI"])
@pytest.mark.parametrize(("policy", "dane", "kind"), [
    (OPP, False, TLSHandshakeError), (REQ, False, TLSHandshakeError),
    (OPP, True, DANEFailure)])
def test_a_reply_injected_after_the_starttls_220_refuses_the_session(
        injected: bytes, policy: TLSPolicy, dane: bool, kind: type) -> None:
    """The STARTTLS command-injection class: bytes after the 220 came in plain text; a
    complete reply or half of one, the client never begins TLS on top of them."""
    def inject(data: bytes) -> bytes:
        return data + injected if data.startswith(b"220 2.0.0") else data
    began: list[BeginTLS] = []
    wire = Wire(tamper=inject, tls_available=True)
    err = error_of(drive(wire, handshake(policy, dane=DANE_EE if dane else None),
                         began=began))
    assert type(err) is kind and "data sent before the TLS handshake" in str(err)
    assert began == [] and wire.writes == [EHLO, STARTTLS]


# -- the TLS handshake's result --------------------------------------------------------------
def test_a_failed_tls_handshake_under_each_policy() -> None:
    texts = {}
    for policy in (OPP, REQ, MTA_STS_ENFORCE):
        wire = Wire(tls_available=True)
        err = error_of(drive(wire, handshake(policy), tls_error="timed out"))
        assert type(err) is TLSHandshakeError and err.enhanced == "4.7.5"
        texts[policy.mode] = err.text
        assert wire.writes == [EHLO, STARTTLS]
    assert texts[OPPORTUNISTIC] == "TLS handshake with mx.test failed: timed out"
    assert texts[REQUIRED].startswith("TLS is required for x.test")
    assert "MTA-STS policy of x.test" in texts["mta-sts"]


def test_an_unverified_certificate_is_told_apart_and_the_retry_records_it() -> None:
    wire = Wire(tls_available=True)
    err = error_of(drive(wire, handshake(OPP), tls_error="self-signed certificate",
                         unverified=True))
    assert isinstance(err, CertificateUnverified) and err.reason == "self-signed certificate"
    # The caller connects again encrypting without verification, the reason recorded.
    again = handshake(TLSPolicy(OPPORTUNISTIC, verify=False), verify_error=err.reason)
    began: list[BeginTLS] = []
    assert isinstance(drive(Wire(tls_available=True), again, began=began), Ready)
    assert began == [BeginTLS(False, (), verify=False, warn_unverified=False)]
    assert again.encrypted and again.tls_notes == {
        "verified": "no", "verify_error": "self-signed certificate"}


def test_accept_invalid_certs_asks_for_the_warning() -> None:
    began: list[BeginTLS] = []
    hs = handshake(TLSPolicy(REQUIRED, verify=False))
    assert isinstance(drive(Wire(tls_available=True), hs, began=began), Ready)
    assert began[0].warn_unverified and not began[0].verify
    assert hs.tls_notes == {"verified": "no"}


# -- DANE -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, certs.CertPair]:
    directory: Path = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(directory)
    return {"ca": ca, "leaf": certs.make_server_cert(directory, ca, "mx.test"),
            "other": certs.make_self_signed(directory, "mx.test")}


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


DANE_EE = requirement("mx.test", [TLSARecord(3, 1, 1, b"\0" * 32)])


def test_dane_ee_match_then_ehlo_over_tls(pki: dict[str, certs.CertPair]) -> None:
    dane = requirement("mx.test", [TLSARecord(3, 1, 1, sha256(certs.spki(pki["leaf"])))])
    wire, hs = Wire(tls_available=True), handshake(OFF, dane=dane)
    began: list[BeginTLS] = []
    step = drive(wire, hs, chain=[certs.der(pki["leaf"])], began=began)
    assert began == [BeginTLS(True, (), verify=False)]
    assert isinstance(step, Ready) and wire.writes == [EHLO, STARTTLS, EHLO]
    assert hs.verdict is not None and hs.verdict.status == VERIFIED
    assert hs.verdict.description.startswith("DANE-EE 3 1 1")
    assert hs.tls_notes == {}  # the DANE verdict says it


def test_dane_certificate_matching_no_record_fails_before_any_ehlo(
        pki: dict[str, certs.CertPair]) -> None:
    dane = requirement("mx.test", [TLSARecord(3, 1, 1, sha256(certs.spki(pki["leaf"])))])
    wire = Wire(tls_available=True)
    err = error_of(drive(wire, handshake(OPP, dane=dane), chain=[certs.der(pki["other"])]))
    assert isinstance(err, DANEFailure) and err.text.startswith(
        "DANE: certificate of mx.test rejected: it matches none of the TLSA records")
    assert wire.writes == [EHLO, STARTTLS]  # nothing said over the unauthenticated TLS


def test_dane_ta_asks_to_reconnect_with_the_anchor_then_verifies(
        pki: dict[str, certs.CertPair]) -> None:
    ca_der = certs.der(pki["ca"])
    dane = requirement("mx.test", [TLSARecord(2, 0, 1, sha256(ca_der))])
    chain = [certs.der(pki["leaf"]), ca_der]
    first = handshake(OPP, dane=dane)
    step = drive(Wire(tls_available=True), first, chain=chain)
    assert step == Reconnect((ca_der,)) and isinstance(step, Reconnect)
    began: list[BeginTLS] = []
    second = handshake(OPP, dane=dane, anchors=step.anchors)
    ready = drive(Wire(tls_available=True), second, chain=chain, began=began)
    assert began == [BeginTLS(True, (ca_der,), verify=False)]
    assert isinstance(ready, Ready) and second.verdict is not None
    assert second.verdict.status == VERIFIED and "DANE-TA 2 0 1" in second.verdict.description
    # The anchored handshake failing (OpenSSL refused the chain) names the anchor.
    third = handshake(OPP, dane=dane, anchors=(ca_der,))
    err = error_of(drive(Wire(tls_available=True), third, tls_error="certificate expired",
                         unverified=True))
    assert isinstance(err, DANEFailure) and "DANE-TA trust anchor: certificate expired" in (
        err.text)


# -- replies out of turn ---------------------------------------------------------------------
def test_a_reply_to_a_finished_or_waiting_handshake_is_a_protocol_error() -> None:
    wire, hs = Wire(tls_available=True), handshake(OPP)
    assert hs.receive(wire.reply()) == Command(EHLO, "ehlo")
    wire.send(EHLO)
    assert hs.receive(wire.reply()) == Command(STARTTLS, "starttls")
    wire.send(STARTTLS)
    assert isinstance(hs.receive(wire.reply()), BeginTLS)
    with pytest.raises(ProtocolError, match="out of turn"):  # waiting for TLS, not a reply
        hs.receive(_reply("250 2.0.0 ok"))
    done = handshake(OFF)
    drive(Wire(), done)
    with pytest.raises(ProtocolError, match="out of turn"):
        done.receive(_reply("250 2.0.0 late"))
    with pytest.raises(RuntimeError):
        handshake().tls_established([])


# -- transactions after the handshake --------------------------------------------------------
def transact(wire: Wire, txn: Transaction, body: bytes,
             chunks: list[int] | None = None) -> dict[str, RecipientOutcome]:
    """What connection.SMTPConnection.deliver does, in memory: the envelope (pipelined or
    not), the data dot-stuffed or in BDAT chunks, the verdicts; a 421 ends it as the
    connection does (``outcomes_after_error``)."""
    wire.send(txn.start(), txn.start_replies)
    while not txn.finished:
        reply = wire.reply()
        if reply.code == 421:
            err = error_for_reply(reply.code, reply.enhanced, reply.text, "mx.test")
            return outcomes_after_error(txn, err, "mx.test")
        follow = txn.receive(reply)
        if follow:
            wire.send(follow)
    final: Reply | None = None
    if txn.use_data and txn.data_accepted:
        stuffer = DotStuffer()
        if txn.accepted:
            wire.send(stuffer.feed(body), replies=0)
        wire.send(stuffer.finish())
        final = wire.reply() if txn.accepted else None
        if not txn.accepted:
            wire.reply()
    elif not txn.use_data and txn.accepted:
        sizes, pos = chunks or [len(body)], 0
        for index, size in enumerate(sizes):
            last = index == len(sizes) - 1
            wire.send(bdat_command(size, last) + body[pos:pos + size])
            pos += size
            final = wire.reply()
            check_chunk_reply(final)
            if not final.is_positive:
                break
    return txn.outcomes(final, "mx.test")


def ready_wire(tamper: Callable[[bytes], bytes] | None = None,
               **settings: object) -> tuple[Wire, Extensions]:
    wire = Wire(tamper, **settings)
    step = drive(wire, handshake(OFF))
    assert isinstance(step, Ready)
    return wire, step.extensions


def envelope_txn(ext: Extensions, rcpts: list[str], *, body: str | None = None,
                 size: int = 10) -> Transaction:
    env = {"id": "X", "sender": "s@a.test",
           "params": {"body": body, "smtputf8": False, "ret": None, "envid": None}}
    cmds = [(a, rcpt_command({"address": a, "orcpt": None, "notify": None}, ext))
            for a in rcpts]
    return Transaction(mail_command(env, size, ext), cmds,
                       pipelining=ext.has("PIPELINING"), use_data=body != "BINARYMIME")


def test_submission_server_requires_auth_and_the_client_fails_with_its_530() -> None:
    """A submission-like listener (AUTH advertised and required): the relay client does not
    authenticate, so MAIL is refused with the server's 530 and every recipient fails with it;
    no data is sent."""
    wire, ext = ready_wire(auth_offered=True, auth_required=True, auth_plaintext_ok=True)
    assert ext.keywords["AUTH"] == "PLAIN LOGIN"
    txn = envelope_txn(ext, ["u@x.test", "v@x.test"])
    out = transact(wire, txn, b"hi\r\n")
    assert {(o.status, o.code, o.enhanced) for o in out.values()} == {(FAILED, 530, "5.7.0")}
    assert txn.rcpt_replies and {r.code for r in txn.rcpt_replies} == {503}
    assert wire.stored == [] and len(wire.writes) == 2  # EHLO, the pipelined envelope


def test_pipelined_envelope_with_refused_recipients_delivers_to_the_rest() -> None:
    wire, ext = ready_wire(local_users=frozenset({"u", "w"}))
    txn = envelope_txn(ext, ["u@x.test", "nobody@x.test", "v@elsewhere.test", "w@x.test"])
    out = transact(wire, txn, b"Subject: t\r\n\r\n.dot\r\n")
    assert wire.writes[1].count(b"\r\n") == 6  # MAIL, four RCPT, DATA in one write
    assert {a: (o.status, o.code) for a, o in out.items()} == {
        "u@x.test": (DELIVERED, 250), "nobody@x.test": (FAILED, 550),
        "v@elsewhere.test": (FAILED, 554), "w@x.test": (DELIVERED, 250)}
    [(env, data)] = wire.stored
    assert [r["address"] for r in env.recipients] == ["u@x.test", "w@x.test"]
    assert data == b"Subject: t\r\n\r\n.dot\r\n"


def test_pipelined_envelope_with_every_recipient_refused_sends_no_data() -> None:
    wire, ext = ready_wire()
    txn = envelope_txn(ext, ["a@elsewhere.test", "b@elsewhere.test"])
    out = transact(wire, txn, b"hi\r\n")
    assert txn.data_reply is not None and txn.data_reply.code == 554  # no valid recipients
    assert {o.code for o in out.values()} == {554} and wire.stored == []
    assert len(wire.writes) == 2


def test_bdat_chunks_with_last_carry_binary_data_unstuffed() -> None:
    wire, ext = ready_wire()
    assert ext.has("CHUNKING")
    body = b"Subject: b\r\n\r\n.leading dot\r\n\x00\xffbinary\r\n"
    txn = envelope_txn(ext, ["u@x.test"], body="BINARYMIME", size=len(body))
    assert not txn.start().endswith(b"DATA\r\n")
    out = transact(wire, txn, body, chunks=[7, len(body) - 7])
    assert out["u@x.test"].status == DELIVERED and out["u@x.test"].text.startswith("OK queued")
    assert wire.writes[2].startswith(b"BDAT 7\r\n")
    assert wire.writes[3].startswith(b"BDAT %d LAST\r\n" % (len(body) - 7))
    assert wire.stored[0][1] == body  # octets as sent, no dot-stuffing


def test_bdat_zero_last_is_an_empty_message() -> None:
    wire, ext = ready_wire()
    txn = envelope_txn(ext, ["u@x.test"], body="BINARYMIME", size=0)
    out = transact(wire, txn, b"", chunks=[0])
    assert wire.writes[-1] == b"BDAT 0 LAST\r\n"
    assert out["u@x.test"].status == DELIVERED and wire.stored[0][1] == b""


def test_a_421_mid_transaction_keeps_final_refusals_and_defers_the_rest() -> None:
    def tamper(data: bytes) -> bytes:
        if b"<b@x.test> OK" in data:  # the second RCPT's 250 becomes the server leaving
            return data.replace(b"250 2.1.5 Recipient <b@x.test> OK\r\n",
                                b"421 4.3.2 mx.test shutting down\r\n")
        return data
    wire, ext = ready_wire(tamper=tamper)
    ext = Extensions({k: v for k, v in ext.keywords.items() if k != "PIPELINING"})
    txn = envelope_txn(ext, ["a@elsewhere.test", "b@x.test", "c@x.test"])
    out = transact(wire, txn, b"hi\r\n")
    assert (out["a@elsewhere.test"].status, out["a@elsewhere.test"].code) == (FAILED, 554)
    assert {(out[a].status, out[a].code) for a in ("b@x.test", "c@x.test")} == {
        (DEFERRED, 421)}
    assert b"RCPT TO:<c@x.test>\r\n" not in wire.writes and wire.stored == []


def test_a_reply_out_of_turn_mid_transaction_defers_everyone() -> None:
    def tamper(data: bytes) -> bytes:
        return data + b"250 2.0.0 bonus\r\n" if b"354 " in data else data
    wire, ext = ready_wire(tamper=tamper)
    txn = envelope_txn(ext, ["a@elsewhere.test", "u@x.test"])
    with pytest.raises(ProtocolError, match="unexpected reply"):
        transact(wire, txn, b"hi\r\n")
    failure = ProtocolFailure.make("protocol", server="mx.test", reason="unexpected reply")
    out = outcomes_after_error(txn, failure, "mx.test")
    # The relay refusal is not trusted either: replies out of turn match nobody.
    assert {(o.status, o.enhanced) for o in out.values()} == {(DEFERRED, "4.5.0")}


def test_rset_between_transactions_and_quit_at_the_end() -> None:
    wire, ext = ready_wire()
    for n in (1, 2):
        out = transact(wire, envelope_txn(ext, ["u@x.test"]), b"n=%d\r\n" % n)
        assert out["u@x.test"].status == DELIVERED
        wire.send(RSET)
        assert wire.reply().code == 250
    assert [data for _, data in wire.stored] == [b"n=1\r\n", b"n=2\r\n"]
    wire.send(QUIT)
    assert wire.reply().code == 221 and wire.closed


def _reply(line: str) -> Reply:
    channel = ReplyChannel()
    channel.feed(line.encode() + b"\r\n")
    reply = channel.next()
    assert reply is not None
    return reply


def test_pipelined_transaction_with_dsn_and_a_refused_recipient() -> None:
    """DSN parameters reach the receiver's envelope, and the data, fed in odd-sized pieces
    through the DotStuffer, arrives byte for byte."""
    wire, ext = ready_wire()
    assert ext.has("PIPELINING") and ext.has("DSN")
    env = {"id": "X", "sender": "s@a.test", "params": {
        "body": "8BITMIME", "smtputf8": False, "ret": "HDRS", "envid": "env 1"}}
    rcpts = [{"address": "u@x.test", "orcpt": "rfc822;U+1@x.test", "notify": ["FAILURE"]},
             {"address": "v@elsewhere.test", "orcpt": None, "notify": None}]
    txn = Transaction(mail_command(env, 50, ext),
                      [(r["address"], rcpt_command(r, ext)) for r in rcpts],
                      pipelining=True)
    wire.send(txn.start(), txn.start_replies)
    assert len(wire.writes) == 2  # EHLO, then the whole envelope in one write
    while not txn.finished:
        txn.receive(wire.reply())
    assert txn.send_message and txn.accepted == ["u@x.test"]
    body = b"Subject: t\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
    rng = random.Random(7)
    stuffer = DotStuffer()
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 7)
        wire.send(stuffer.feed(body[pos:pos + step]), replies=0)
        pos += step
    wire.send(stuffer.finish())
    out = txn.outcomes(wire.reply(), "mx.test")
    assert out["u@x.test"].status == DELIVERED
    assert out["v@elsewhere.test"].status == FAILED  # relay denied by the receiver
    [(stored_env, data)] = wire.stored
    assert data == body
    assert stored_env.envid == "env 1" and stored_env.ret == "HDRS"
    assert stored_env.recipients[0]["orcpt"] == "rfc822;U+1@x.test"
    assert stored_env.recipients[0]["notify"] == ["FAILURE"]
