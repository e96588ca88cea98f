"""The SMTP client's session set-up, sans I/O: from the greeting to a session ready for MAIL.

Owns ``Handshake`` and the steps it hands out (``Command``, ``BeginTLS``, ``Ready``, ``Fail``,
``Reconnect``): the greeting (220 or a refusal), EHLO and the HELO fallback (RFC 5321 §3.2),
STARTTLS when the TLS policy or DANE asks for it, EHLO again over TLS (RFC 3207 §4.2), and
what a missing or refused STARTTLS, a failed TLS handshake or a DANE mismatch means under
each policy (DANE, MTA-STS ``enforce``, ``required``, ``opportunistic``, ``disabled``): the
errors ``TLSPolicyFailure``, ``TLSHandshakeError``, ``CertificateUnverified`` and
``DANEFailure``, which ``remote.py`` reads to choose between the next host, the same host
in plain, and a fresh connection. Also the STARTTLS command-injection check: bytes unread
after the server's 220 to STARTTLS refuse the session.

Replies come parsed from ``client.py`` (``Reply``, ``Extensions``); the transaction that
follows is ``client.py``'s too. ``empath/delivery/connection.py`` sends the commands, reads
the replies and runs the TLS handshake when told to; ``tests/unit/test_client_pair.py``
drives it against the receiver's ``ServerSession`` in memory.

Never touches a socket, a file or a clock, so every rule here is unit-testable with bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from empath.delivery.client import Extensions, ProtocolError, Reply
from empath.delivery.dane import (
    ENCRYPTED,
    NEEDS_ANCHOR,
    VERIFIED,
    DaneRequirement,
    Verdict,
    check_chain,
)
from empath.delivery.errors import DeliveryError, TemporaryError, error_for_reply
from empath.delivery.tls import TLSPolicy


class TLSPolicyFailure(TemporaryError):
    """The TLS policy (required, MTA-STS enforce) was not met by a server that answered: no
    STARTTLS offered, STARTTLS refused, or (the subclass) a failed handshake."""


class TLSHandshakeError(TLSPolicyFailure):
    """STARTTLS was accepted but the handshake failed; the connection is unusable.

    Under an opportunistic policy the caller reconnects to the same host without TLS."""


class CertificateUnverified(TLSHandshakeError):
    """The handshake failed only because the certificate did not verify (untrusted issuer,
    wrong name, expired). Under an opportunistic policy the caller reconnects with TLS that
    does not verify, never in plain: opportunistic means encrypt whenever offered."""

    def __init__(self, code: int, enhanced: str | None, text: str,
                 server: str | None = None) -> None:
        super().__init__(code, enhanced, text, server)
        self.reason = ""


class DANEFailure(TemporaryError):
    """DANE applies to the host and was not satisfied (no STARTTLS, a failed handshake, a
    certificate matching no TLSA record). Never retried in plain: the next host is tried."""


STARTTLS = b"STARTTLS\r\n"


@dataclass(frozen=True, slots=True)
class Command:
    """Send ``command``; its one reply is awaited within the ``stage`` timeout."""

    command: bytes
    stage: str


@dataclass(frozen=True, slots=True)
class BeginTLS:
    """Run the TLS handshake now, then call ``tls_established`` or ``tls_failed``.

    ``dane``: with the DANE context (trusting exactly ``anchors``, or verifying nothing when
    there are none) and the server's chain reported back; otherwise with the policy's
    context (``verify``: whether the certificate must verify). ``warn_unverified``: the
    certificate goes unchecked by the operator's choice (``accept_invalid_certs``), which
    every such connection logs."""

    dane: bool
    anchors: tuple[bytes, ...]
    verify: bool
    warn_unverified: bool = False


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is ready for MAIL, with these extensions."""

    extensions: Extensions


@dataclass(frozen=True, slots=True)
class Fail:
    """No session with this server: close the connection and report ``error``."""

    error: DeliveryError


@dataclass(frozen=True, slots=True)
class Reconnect:
    """DANE-TA: QUIT, then connect to the same server again trusting ``anchors`` alone
    (RFC 7672 §3.1.2: OpenSSL then verifies the chain up to them)."""

    anchors: tuple[bytes, ...]


Step = Command | BeginTLS | Ready | Fail | Reconnect

# Handshake phases: the reply awaited, or what the handshake waits for instead.
GREETING, EHLO, HELO, STARTTLS_REPLY, TLS, DONE = (
    "greeting", "ehlo", "helo", "starttls", "tls", "done")
_STAGE = {GREETING: "banner", EHLO: "ehlo", HELO: "ehlo", STARTTLS_REPLY: "starttls",
          TLS: "starttls"}  # the timeout (delivery.timeouts.*) of each wait


class Handshake:
    """The client side of session set-up, sans I/O: replies in, the next step out.

    From the greeting to a session ready for MAIL: 220 or a refusal, EHLO (HELO when EHLO
    is refused with a 5xx, RFC 5321 §3.2), STARTTLS when the TLS policy or DANE asks for it,
    the TLS handshake (run by the caller on ``BeginTLS``, its result reported back), EHLO
    again over TLS (RFC 3207 §4.2). Each call returns one ``Step``: a ``Command`` to send,
    ``BeginTLS``, ``Ready``, ``Fail`` with the DeliveryError that ends the attempt, or
    ``Reconnect`` (DANE-TA). What each failure means follows the policy:

    - DANE (a ``DaneRequirement``): STARTTLS is mandatory; no STARTTLS, a refused one, a
      failed handshake or a chain that matches no usable TLSA record (``dane.check_chain``)
      is a ``DANEFailure``, never plain text;
    - ``required`` and MTA-STS ``enforce``: no STARTTLS or a refused one is a
      ``TLSPolicyFailure``, a failed handshake a ``TLSHandshakeError`` (texts that name the
      policy);
    - ``opportunistic``: no STARTTLS or a refused one goes on in plain (``tls_failure`` says
      why); a failed handshake is a ``TLSHandshakeError`` (``CertificateUnverified`` when
      only the certificate failed), which the caller answers with a fresh connection;
    - ``disabled``, or ``try_tls=False``: no STARTTLS.

    Bytes that arrive after the 220 to STARTTLS came in plain text and could be injected
    replies (the STARTTLS command-injection class of bugs): ``receive(..., unread=True)``
    then refuses the session. A reply out of turn is a ProtocolError.
    """

    def __init__(self, helo: str, policy: TLSPolicy, *, server: str, domain: str,
                 try_tls: bool = True, dane: DaneRequirement | None = None,
                 anchors: tuple[bytes, ...] = (), verify_error: str | None = None) -> None:
        self.helo = helo
        self.policy = policy
        self.server = server
        self.domain = domain
        self.dane = dane
        self.anchors = anchors
        self.verify_error = verify_error  # the certificate is known not to verify: why
        self.wants_tls = dane is not None or (policy.wants_tls and try_tls)
        self.phase = GREETING
        self.encrypted = False
        self.extensions = Extensions()
        self.tls_failure: str | None = None  # why a session that wanted TLS is in plain
        self.verdict: Verdict | None = None  # the DANE verdict, when DANE applied

    @property
    def expecting(self) -> str:
        """The stage of the reply awaited, for its timeout (``banner``, ``ehlo``,
        ``starttls``; ``quit`` once the handshake is over)."""
        return _STAGE.get(self.phase, "quit")

    def receive(self, reply: Reply, *, unread: bool = False) -> Step:
        """The server's next reply; ``unread``: more bytes from the server follow it."""
        handler = _ON_REPLY.get(self.phase)
        if handler is None:
            raise ProtocolError(f"reply {str(reply)[:80]!r} out of turn ({self.phase})")
        return handler(self, reply, unread)

    @property
    def tls_notes(self) -> dict[str, str]:
        """What the attempt history records of certificate verification (none under DANE,
        whose verdict says it)."""
        if self.dane is not None:
            return {}
        notes = {"verified": "yes" if self.policy.verify else "no"}
        if self.verify_error is not None:
            notes["verify_error"] = self.verify_error
        return notes

    def tls_established(self, chain: list[bytes] | None = None) -> Step:
        """The TLS handshake completed. Under DANE ``chain`` is the server's chain (leaf
        first; the verified chain when ``anchors`` were trusted), judged by ``check_chain``."""
        self._in_tls()
        if self.dane is not None:
            verdict = check_chain(self.dane, chain or [], anchored=bool(self.anchors))
            if verdict.status == NEEDS_ANCHOR and not self.anchors:  # at most once
                self.phase = DONE
                return Reconnect(verdict.anchors)
            if verdict.status not in (VERIFIED, ENCRYPTED):
                return self._fail(DANEFailure.make("dane_mismatch", server=self.server,
                                                   reason=verdict.reason))
            self.verdict = verdict
        self.encrypted = True
        # RFC 3207 §4.2: all knowledge from before TLS is discarded; EHLO again.
        self.extensions = Extensions()
        return self._ehlo()

    def tls_failed(self, reason: str, *, unverified: bool = False) -> Step:
        """The TLS handshake did not complete; ``unverified``: only because the certificate
        did not verify. The connection is unusable either way."""
        self._in_tls()
        if self.dane is not None:
            if self.anchors:
                reason = f"chain does not verify to its DANE-TA trust anchor: {reason}"
            return self._fail(DANEFailure.make("dane_tls_failed", server=self.server,
                                               reason=reason))
        error = (CertificateUnverified if unverified else TLSHandshakeError).make(
            self._tls_kind, server=self.server, domain=self.domain, reason=reason)
        if isinstance(error, CertificateUnverified):
            error.reason = reason
        return self._fail(error)

    # -- one method per awaited reply -----------------------------------------------------
    def _on_greeting(self, reply: Reply, unread: bool) -> Step:
        if reply.code != 220:
            # 421/554 greetings: this host will not talk to us; the caller tries the next.
            return self._refused(reply)
        return self._ehlo()

    def _on_ehlo(self, reply: Reply, unread: bool) -> Step:
        if reply.code == 250:
            return self._greeted(Extensions.from_reply(reply))
        if not reply.is_permanent:  # 421 and other 4xx: not now; 2xx/3xx: not an answer
            return self._refused(reply)
        # RFC 5321 §3.2: a server that refuses EHLO may still speak HELO.
        self.phase = HELO
        return Command(f"HELO {self.helo}\r\n".encode(), "ehlo")

    def _on_helo(self, reply: Reply, unread: bool) -> Step:
        if reply.code != 250:
            return self._refused(reply)
        return self._greeted(Extensions())

    def _on_starttls(self, reply: Reply, unread: bool) -> Step:
        if reply.code == 421:  # RFC 5321 §3.8: the server closes the channel, whatever TLS
            return self._refused(reply)
        if reply.code != 220:
            reason = f"STARTTLS refused: {reply}"
            if self.dane is not None:
                return self._fail(DANEFailure.make("dane_tls_failed", server=self.server,
                                                   reason=reason))
            if self.policy.requires_tls:
                kind = "mta_sts_tls_failed" if self.policy.is_mta_sts else "tls_failed"
                return self._fail(TLSPolicyFailure.make(kind, server=self.server,
                                                        domain=self.domain, reason=reason))
            self.tls_failure = reason
            return self._ready()  # opportunistic: the session goes on in plain (RFC 3207 §4)
        if unread:
            # The STARTTLS command-injection class of bugs: refuse the session.
            reason = "data sent before the TLS handshake"
            if self.dane is not None:
                return self._fail(DANEFailure.make("dane_tls_failed", server=self.server,
                                                   reason=reason))
            return self._fail(TLSHandshakeError.make(self._tls_kind, server=self.server,
                                                     domain=self.domain, reason=reason))
        self.phase = TLS
        if self.dane is not None:
            return BeginTLS(True, self.anchors, verify=False)
        return BeginTLS(False, (), self.policy.verify, warn_unverified=(
            not self.policy.verify and self.verify_error is None))

    # -- shared steps ---------------------------------------------------------------------
    def _ehlo(self) -> Command:
        self.phase = EHLO
        return Command(f"EHLO {self.helo}\r\n".encode(), "ehlo")

    def _greeted(self, extensions: Extensions) -> Step:
        """EHLO or HELO answered 250: ready, or STARTTLS first as the policy says."""
        self.extensions = extensions
        if self.encrypted or not self.wants_tls:
            return self._ready()
        if extensions.has("STARTTLS"):
            self.phase = STARTTLS_REPLY
            return Command(STARTTLS, "starttls")
        if self.dane is not None:  # RFC 7672 §2.2: TLSA records mean STARTTLS is a must
            return self._fail(DANEFailure.make("dane_no_starttls", server=self.server))
        if self.policy.requires_tls:
            kind = "mta_sts_no_starttls" if self.policy.is_mta_sts else "tls_not_offered"
            return self._fail(TLSPolicyFailure.make(kind, server=self.server,
                                                    domain=self.domain))
        self.tls_failure = "STARTTLS not offered"
        return self._ready()

    @property
    def _tls_kind(self) -> str:
        """The REPLIES entry of a failed TLS handshake under this policy."""
        if self.policy.is_mta_sts:
            return "mta_sts_tls_failed"
        return "tls_failed" if self.policy.requires_tls else "tls_handshake"

    def _in_tls(self) -> None:
        if self.phase != TLS:
            raise RuntimeError(f"no TLS handshake was asked for ({self.phase})")

    def _ready(self) -> Ready:
        self.phase = DONE
        return Ready(self.extensions)

    def _refused(self, reply: Reply) -> Fail:
        return self._fail(error_for_reply(reply.code, reply.enhanced, reply.text, self.server))

    def _fail(self, error: DeliveryError) -> Fail:
        self.phase = DONE
        return Fail(error)


_ON_REPLY: dict[str, Callable[[Handshake, Reply, bool], Step]] = {
    GREETING: Handshake._on_greeting, EHLO: Handshake._on_ehlo, HELO: Handshake._on_helo,
    STARTTLS_REPLY: Handshake._on_starttls,
}
