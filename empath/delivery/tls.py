"""Outbound TLS: the policy for each destination and the ssl contexts that carry it out.

Owns the decision *whether* and *how strictly* to use STARTTLS toward a domain:

- ``opportunistic``: STARTTLS when the server offers it; plain when it does not, and plain on a
  fresh connection when the handshake fails (RFC 7435: opportunistic security must never make
  mail less deliverable than plain SMTP would);
- ``required``: never send in plain; no STARTTLS offered, or a failed handshake, is a temporary
  failure (RFC 3207 §4.1 lets a client decide it will not proceed without TLS);
- ``disabled``: never STARTTLS.

A domain's own ``tls`` and ``accept_invalid_certs`` settings win over the global ones, both
ways. Certificates are verified against ``ca_file`` or the system store, with the host name
checked against the MX name; accepting invalid certificates turns both checks off, and every
connection that does so is logged as a warning, so an operator can see what trusts nothing.

Never opens a connection itself and never touches the spool.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("empath.delivery.tls")

OPPORTUNISTIC, REQUIRED, DISABLED = "opportunistic", "required", "disabled"


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """How to treat TLS toward one destination domain."""

    mode: str  # opportunistic | required | disabled
    verify: bool  # False: accept certificates that do not verify (logged per connection)

    @property
    def wants_tls(self) -> bool:
        return self.mode != DISABLED

    @property
    def requires_tls(self) -> bool:
        return self.mode == REQUIRED


def policy_for(delivery_cfg: Any, domain: str) -> TLSPolicy:
    """The TLS policy for ``domain``: its own settings first, then the global ones."""
    tls_cfg = delivery_cfg.tls
    mode = tls_cfg.default_policy
    accept_invalid = bool(tls_cfg.accept_invalid_certs)
    override = delivery_cfg.domains.get(domain.lower()) if delivery_cfg.domains else None
    if override is not None:
        if override.tls is not None:
            mode = override.tls
        if override.accept_invalid_certs is not None:
            accept_invalid = bool(override.accept_invalid_certs)
    return TLSPolicy(mode, verify=not accept_invalid)


class TLSContexts:
    """The two client ssl contexts (verifying and not), built once and shared."""

    def __init__(self, ca_file: str | None) -> None:
        self.ca_file = ca_file
        self._verifying: ssl.SSLContext | None = None
        self._lenient: ssl.SSLContext | None = None

    def context(self, policy: TLSPolicy) -> ssl.SSLContext:
        if policy.verify:
            if self._verifying is None:
                self._verifying = self._build(verify=True)
            return self._verifying
        if self._lenient is None:
            self._lenient = self._build(verify=False)
        return self._lenient

    def _build(self, verify: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        # TLS 1.0/1.1 are deprecated (RFC 8996); create_default_context already refuses them
        # on current OpenSSL, this makes it explicit.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def warn_unverified(domain: str, server: str, ip: str) -> None:
    """Every connection that skips certificate checks says so."""
    log.warning("TLS to %s [%s] for %s: certificate not verified (accept_invalid_certs)",
                server, ip, domain)


def describe(ssl_object: Any) -> dict[str, str] | None:
    """The TLS version and cipher of an established connection, for the attempt history."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"version": str(ssl_object.version()), "cipher": str(cipher[0]) if cipher else ""}
