"""Typed delivery errors and the status codes the SMTP client reports on its own behalf.

Every failure of remote delivery is one of three kinds, each carrying an SMTP reply code, an
RFC 3463 enhanced status code, a text and the server that said it (None when the verdict is
ours: DNS, a timeout, a TLS policy):

- ``PermanentError``: 5xx from a server, or a local verdict that retrying cannot change (null
  MX, NXDOMAIN, message larger than the server's SIZE). The recipient fails and is bounced.
- ``TemporaryError``: 4xx, network errors, timeouts, DNS SERVFAIL, TLS required but not
  available. The recipient is deferred and retried later.
- ``LocalSystemError``: a problem on this machine (the queue file cannot be read, an ssl
  context cannot be built). Deferred too, but logged as ours, not the destination's.

This module is the one place where the delivery side spells the codes it generates itself
(``REPLIES``), the counterpart of ``empath/smtp/replies.py`` on the receiving side. It never
touches a socket, a file or a clock.
"""

from __future__ import annotations

from typing import Any, Self

from empath.delivery.state import DEFERRED, FAILED, RecipientOutcome

# Codes for verdicts the client reaches without a server reply (RFC 3463 subjects in comments).
REPLIES: dict[str, tuple[int, str, str]] = {
    # RFC 7505 §4.1: a null MX means the domain accepts no mail; 556 5.1.10.
    "null_mx": (556, "5.1.10", "domain {domain} does not accept mail (null MX)"),
    # X.1.2: bad destination system address (the domain does not exist).
    "nxdomain": (550, "5.1.2", "domain {domain} does not exist"),
    "no_address": (550, "5.1.2", "domain {domain} has neither MX nor address records"),
    # X.4.3: directory server failure (SERVFAIL, DNS timeout).
    "dns_temp": (451, "4.4.3", "DNS lookup of {name} failed: {reason}"),
    # X.4.4: unable to route (MX hosts without addresses).
    "no_route": (451, "4.4.4", "no usable address for the MX hosts of {domain}"),
    # X.4.6: routing loop detected (we are the best MX of the domain).
    "loops": (554, "5.4.6", "mail for {domain} loops back to myself"),
    # X.4.1: no answer from host; X.4.2: bad connection.
    "connect": (451, "4.4.1", "cannot connect to {server}: {reason}"),
    "timeout": (451, "4.4.2", "timeout waiting for {stage} reply from {server}"),
    "lost": (451, "4.4.2", "connection to {server} lost during {stage}: {reason}"),
    "protocol": (451, "4.5.0", "bad SMTP reply from {server}: {reason}"),
    # X.7.4: security features not supported; X.7.5: cryptographic failure.
    "tls_not_offered": (451, "4.7.4", "TLS is required for {domain} but {server} does not "
                        "offer STARTTLS"),
    "tls_failed": (451, "4.7.5", "TLS is required for {domain} but the handshake with "
                   "{server} failed: {reason}"),
    # Opportunistic TLS (RFC 7435): the handshake failed; the same server is tried in plain.
    "tls_handshake": (451, "4.7.5", "TLS handshake with {server} failed: {reason}"),
    # The certificate did not verify: opportunistic TLS goes on encrypted, unauthenticated.
    "tls_unverified": (451, "4.7.5", "certificate of {server} did not verify: {reason}"),
    # Every address tried, or every session allowed, for this attempt (Postfix's
    # smtp_mx_address_limit and smtp_mx_session_limit); X.4.4: unable to route.
    "mx_limit": (451, "4.4.4", "no server of {domain} took the message within the limit of "
                 "{limit}"),
    # DNSSEC (dnssec.py): a validation failure, or an unvalidated answer under "enforce".
    "dnssec_bogus": (451, "4.4.3", "DNSSEC validation of {name} failed (bogus answer)"),
    "dnssec_unvalidated": (451, "4.4.3", "DNS answer for {name} is not DNSSEC-validated "
                           "and not proven unsigned (dnssec: enforce)"),
    # DANE (RFC 7672): X.7.4 STARTTLS missing, X.7.5 the certificate or the TLS failed.
    "dane_no_starttls": (451, "4.7.4", "{server} has DNSSEC-validated TLSA records but does "
                         "not offer STARTTLS (DANE)"),
    "dane_tls_failed": (451, "4.7.5", "DANE TLS with {server} failed: {reason}"),
    "dane_mismatch": (451, "4.7.5", "DANE: certificate of {server} rejected: {reason}"),
    "dane_required": (451, "4.7.5", "DANE is required for {domain} but {reason}"),
    # MTA-STS (RFC 8461 §5) under mode enforce: never plain, never a host outside the policy
    # (X.7.0, other security status: no code fits better).
    "mta_sts_mx": (451, "4.7.0", "MX host {server} of {domain} is not in its MTA-STS policy "
                   "(mode enforce, mx {patterns})"),
    "mta_sts_no_starttls": (451, "4.7.4", "the MTA-STS policy of {domain} (mode enforce) "
                            "requires TLS but {server} does not offer STARTTLS"),
    "mta_sts_tls_failed": (451, "4.7.5", "the MTA-STS policy of {domain} (mode enforce) "
                           "requires a valid certificate but TLS with {server} failed: "
                           "{reason}"),
    # The destination's circuit breaker (breaker.py) is open: X.4.1, no answer from host.
    "circuit_open": (451, "4.4.1", "not tried: {failures} deliveries in a row to {domain} "
                     "reached no server; next try after {until} (circuit breaker)"),
    "circuit_probing": (451, "4.4.1", "not tried: {failures} deliveries in a row to {domain} "
                        "reached no server and a probe delivery is under way (circuit "
                        "breaker)"),
    # RFC 1870 §6.2: the message exceeds the server's fixed size limit; 552 5.3.4.
    "too_big": (552, "5.3.4", "message of {size} bytes exceeds the {limit}-byte limit of "
                "{server}"),
    # RFC 6531 §3.5: an internationalized message to a server without SMTPUTF8; X.6.7.
    "needs_smtputf8": (553, "5.6.7", "{server} does not support SMTPUTF8, required by this "
                       "message"),
    # RFC 3030 §3: BINARYMIME needs BDAT; X.6.3: conversion required but not supported.
    "needs_binarymime": (554, "5.6.3", "{server} does not support BINARYMIME with CHUNKING, "
                         "required by this message"),
    "local": (451, "4.3.0", "local error: {reason}"),
    "shutdown": (451, "4.3.2", "delivery interrupted: {reason}"),
}


class DeliveryError(Exception):
    """Base of all delivery errors: an SMTP-shaped verdict for one or more recipients."""

    status = DEFERRED

    def __init__(self, code: int, enhanced: str | None, text: str,
                 server: str | None = None) -> None:
        super().__init__(f"{code} {enhanced + ' ' if enhanced else ''}{text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.server = server

    @classmethod
    def make(cls, kind: str, server: str | None = None, **fields: Any) -> Self:
        """An error of this class built from ``REPLIES[kind]``, its text formatted with fields."""
        code, enhanced, template = REPLIES[kind]
        return cls(code, enhanced, template.format(server=server, **fields), server)

    @property
    def is_permanent(self) -> bool:
        return self.status == FAILED

    def outcome(self) -> RecipientOutcome:
        """This error as the outcome of one recipient."""
        return RecipientOutcome(self.status, self.code, self.enhanced, self.text, self.server)


class PermanentError(DeliveryError):
    """A 5xx verdict: the recipient fails."""

    status = FAILED


class TemporaryError(DeliveryError):
    """A 4xx verdict, a network error or a timeout: the recipient is retried later."""

    status = DEFERRED


class LocalSystemError(TemporaryError):
    """Something wrong on this machine; retried, and logged as our fault."""


def error_for_reply(code: int, enhanced: str | None, text: str,
                    server: str | None) -> DeliveryError:
    """The error a non-2xx/3xx server reply stands for: 5xx permanent, anything else temporary.

    RFC 5321 §4.2.1: the first digit decides; a reply outside 2xx-5xx is a protocol
    violation, treated as temporary so a broken server never causes a bounce.
    """
    if 500 <= code <= 599:
        return PermanentError(code, enhanced, text, server)
    return TemporaryError(code, enhanced, text, server)
