"""Outbound TLS: the policy for each destination and the ssl contexts that carry it out.

Owns the decision *whether* and *how strictly* to use STARTTLS toward a domain:

- ``opportunistic``: STARTTLS when the server offers it; plain when it does not, and plain on a
  fresh connection when the handshake cannot complete (RFC 7435: opportunistic security must
  never make mail less deliverable than plain SMTP would). A certificate that fails
  verification is not such a failure: the fresh connection is encrypted without verification
  and the result is recorded (encrypt whenever offered; never a reason to go plain);
- ``required``: never send in plain; no STARTTLS offered, or a failed handshake, is a temporary
  failure (RFC 3207 §4.1 lets a client decide it will not proceed without TLS);
- ``disabled``: never STARTTLS;
- ``dane``: DANE is mandatory (RFC 7672): mail goes only to MX hosts whose DNSSEC-validated TLSA
  records authenticate the certificate; anything less is a temporary failure.

A domain whose MTA-STS policy (``mtasts.py``, RFC 8461) is in mode ``enforce`` is reached
with ``MTA_STS_ENFORCE`` instead of its own policy (not under ``disabled`` or ``dane``, which
the operator chose on purpose): STARTTLS is mandatory and the certificate must verify for the
MX name against the Web PKI (``ca_file`` or the system store), whatever
``accept_invalid_certs`` says.

Under any policy but ``disabled``, an MX host with DNSSEC-validated TLSA records is reached
with DANE (``dane.py``): STARTTLS is mandatory and the certificate is checked against the TLSA
records instead of the Web PKI (no ``ca_file``, no ``accept_invalid_certs``). The ssl layer
then verifies nothing (``dane_context``) and the chain is matched after the handshake; for
DANE-TA a second handshake trusts only the matched certificates (``dane_context(anchors)``).

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

from empath.config.typed import DeliveryConfig

log = logging.getLogger("empath.delivery.tls")

OPPORTUNISTIC, REQUIRED, DISABLED, DANE = "opportunistic", "required", "disabled", "dane"
MTA_STS = "mta-sts"  # not a configurable policy: what an enforced MTA-STS policy demands
ANCHOR_CONTEXTS_KEPT = 64  # DANE-TA contexts cached per worker, oldest out


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """How to treat TLS toward one destination domain."""

    mode: str  # opportunistic | required | disabled | dane | mta-sts
    verify: bool  # False: accept certificates that do not verify (logged per connection)

    @property
    def wants_tls(self) -> bool:
        return self.mode != DISABLED

    @property
    def requires_tls(self) -> bool:
        return self.mode in (REQUIRED, DANE, MTA_STS)

    @property
    def is_mta_sts(self) -> bool:
        return self.mode == MTA_STS

    @property
    def allows_mta_sts(self) -> bool:
        """Whether an MTA-STS policy may apply: not when the operator disabled TLS or made
        DANE mandatory for the domain."""
        return self.mode in (OPPORTUNISTIC, REQUIRED)

    @property
    def requires_dane(self) -> bool:
        return self.mode == DANE


MTA_STS_ENFORCE = TLSPolicy(MTA_STS, verify=True)


def policy_for(delivery_cfg: DeliveryConfig, domain: str) -> TLSPolicy:
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
    """The client ssl contexts (verifying, not verifying, DANE), built once and shared."""

    def __init__(self, ca_file: str | None) -> None:
        self.ca_file = ca_file
        self._verifying: ssl.SSLContext | None = None
        self._lenient: ssl.SSLContext | None = None
        self._anchored: dict[tuple[bytes, ...], ssl.SSLContext] = {}

    def context(self, policy: TLSPolicy) -> ssl.SSLContext:
        if policy.verify:
            if self._verifying is None:
                self._verifying = self._build(verify=True)
            return self._verifying
        if self._lenient is None:
            self._lenient = self._build(verify=False)
        return self._lenient

    def dane_context(self, anchors: tuple[bytes, ...] = ()) -> ssl.SSLContext:
        """For DANE: without ``anchors`` a context that verifies nothing (the TLSA match is
        done after the handshake, RFC 7672 §3); with them, one that trusts exactly those DER
        certificates (DANE-TA), as chain ends even when not self-signed, and checks the
        server's name (the caller passes the MX host as ``server_hostname``)."""
        if not anchors:
            if self._lenient is None:
                self._lenient = self._build(verify=False)
            return self._lenient
        ctx = self._anchored.get(anchors)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata="".join(ssl.DER_cert_to_PEM_cert(a)
                                                     for a in anchors))
            # A DANE-TA anchor may be an intermediate: the chain ends there (RFC 7671 §5.2.2).
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            if len(self._anchored) >= ANCHOR_CONTEXTS_KEPT:
                del self._anchored[next(iter(self._anchored))]
            self._anchored[anchors] = ctx
        return ctx

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


def peer_chain(ssl_object: Any, *, verified: bool = False) -> list[bytes]:
    """The certificates the server sent (leaf first, DER), or the chain OpenSSL verified.

    Python 3.13 has ``SSLObject.get_unverified_chain``/``get_verified_chain``; 3.10 to 3.12
    have the same methods, undocumented, on the ``_ssl`` object inside (``_sslobj``). Where
    neither exists only the leaf is known, which is enough for DANE-EE and for DANE-TA
    records that hold the whole trust-anchor certificate (2 0 0), not for other DANE-TA ones.
    """
    name = "get_verified_chain" if verified else "get_unverified_chain"
    getter = getattr(ssl_object, name, None) or getattr(
        getattr(ssl_object, "_sslobj", None), name, None)
    if getter is None:
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    chain = getter() or []
    # 3.13's public method returns DER bytes; the private one _ssl.Certificate objects.
    der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
    return [c if isinstance(c, bytes) else c.public_bytes(der) for c in chain]


def describe(ssl_object: Any) -> dict[str, str] | None:
    """The TLS version and cipher of an established connection, for the attempt history."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"version": str(ssl_object.version()), "cipher": str(cipher[0]) if cipher else ""}
