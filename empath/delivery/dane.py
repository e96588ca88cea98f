"""DANE for SMTP (RFC 7672, RFC 6698, RFC 7671): which TLSA records bind an MX host, and
whether the certificate chain a server presented matches them.

Owns, as pure functions of bytes:

- which TLSA records are *usable* for SMTP (RFC 7672 §3.1): certificate usages DANE-TA(2) and
  DANE-EE(3), selectors Cert(0) and SPKI(1), matching types Full(0), SHA2-256(1) and
  SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) records are unusable for SMTP (§3.1.3), as is
  anything else; a TLSA RRset without a usable record still makes STARTTLS mandatory, but
  authenticates nothing (§2.2);
- matching one certificate (DER) against one record, the SubjectPublicKeyInfo cut out of the
  certificate by a small DER reader (no X.509 library is needed at run time);
- the verdict on a presented chain (``check_chain``): DANE-EE(3) matches the leaf alone, with no
  name check and no expiry check (§3.1.1); DANE-TA(2) needs the chain from the leaf up to a
  certificate that matches the record to *verify* (signatures, validity, the MX host name,
  §3.1.2, §3.2.2). Signature checks are OpenSSL's: the first handshake (no verification at
  the ssl layer) finds the certificates that match DANE-TA records, and the connection is
  made again with exactly those as the only trust anchors (``needs_anchor``); the second
  handshake is then verified by OpenSSL and its chain checked here once more.

Never touches a socket, the DNS or a clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DANE_TA, DANE_EE = 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCH_FULL, MATCH_SHA256, MATCH_SHA512 = 0, 1, 2
USAGE_NAMES = {DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}

# Verdicts of check_chain.
VERIFIED = "verified"  # a usable record matched (and, for DANE-TA, OpenSSL verified the chain)
ENCRYPTED = "encrypted"  # TLSA present, none usable: TLS is mandatory, nothing is checked
NEEDS_ANCHOR = "needs_anchor"  # DANE-TA candidates found: verify again with them as anchors
MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True)
class TLSARecord:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1: only DANE-TA(2) and DANE-EE(3) with known selector and matching."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1)
                and self.mtype in (0, 1, 2))

    def matches(self, cert_der: bytes) -> bool:
        """Whether ``cert_der`` (one DER certificate) is what this record names."""
        try:
            content = cert_der if self.selector == SELECTOR_CERT else subject_public_key_info(
                cert_der)
        except ValueError:
            return False
        if self.mtype == MATCH_SHA256:
            content = hashlib.sha256(content).digest()
        elif self.mtype == MATCH_SHA512:
            content = hashlib.sha512(content).digest()
        return content == self.data

    def __str__(self) -> str:
        digest = self.data.hex()
        shown = digest if len(digest) <= 16 else digest[:16] + "..."
        return f"{self.usage} {self.selector} {self.mtype} {shown}"


@dataclass(frozen=True, slots=True)
class DaneRequirement:
    """What DANE demands of one MX host: its DNSSEC-validated TLSA RRset.

    ``host`` is the TLSA base domain (the MX host name), the reference identifier of
    DANE-TA(2) name checks and the SNI name (RFC 7672 §3.2.2, §8.1). ``records`` holds the
    usable records only; an empty tuple means "TLS mandatory, unauthenticated" (§2.2)."""

    host: str
    records: tuple[TLSARecord, ...]

    @property
    def authenticates(self) -> bool:
        return bool(self.records)

    @property
    def trust_anchor_records(self) -> tuple[TLSARecord, ...]:
        return tuple(r for r in self.records if r.usage == DANE_TA)


def requirement(host: str, records: list[TLSARecord] | tuple[TLSARecord, ...]
                ) -> DaneRequirement:
    """The requirement of ``host`` from its secure TLSA records (duplicates dropped)."""
    usable = tuple(dict.fromkeys(r for r in records if r.usable))
    return DaneRequirement(host.rstrip(".").lower(), usable)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one presented chain against a requirement."""

    status: str  # VERIFIED | ENCRYPTED | NEEDS_ANCHOR | MISMATCH
    record: TLSARecord | None = None  # the record that matched
    anchors: tuple[bytes, ...] = ()  # NEEDS_ANCHOR: DER certificates to trust, and only them
    reason: str = ""

    @property
    def description(self) -> str:
        """``DANE-EE 3 1 1 ab12...``, for the attempt history and the log."""
        if self.record is None:
            return self.status
        return f"{USAGE_NAMES.get(self.record.usage, '?')} {self.record}"


def check_chain(req: DaneRequirement, chain: list[bytes], *, anchored: bool) -> Verdict:
    """Judge the certificates a server sent (leaf first) against ``req``.

    ``anchored``: the handshake that produced ``chain`` was verified by OpenSSL against
    anchors from ``req``'s DANE-TA records (and ``chain`` is then the verified chain, ending
    at the anchor); otherwise the ssl layer verified nothing.
    """
    if not req.authenticates:
        return Verdict(ENCRYPTED, reason="no usable TLSA records; TLS without authentication")
    if not chain:
        return Verdict(MISMATCH, reason="the server sent no certificate")
    leaf = chain[0]
    for record in req.records:
        if record.usage == DANE_EE and record.matches(leaf):
            return Verdict(VERIFIED, record)  # RFC 7672 §3.1.1: no name, no expiry check
    ta_records = req.trust_anchor_records
    if anchored:
        for cert in chain:
            for record in ta_records:
                if record.matches(cert):
                    return Verdict(VERIFIED, record)
        return Verdict(MISMATCH, reason="the verified chain does not end at a DANE-TA "
                                        "trust anchor")
    anchors = [cert for cert in chain[1:] if any(r.matches(cert) for r in ta_records)]
    # A DANE-TA record holding the whole certificate (2 0 0) is an anchor even when the
    # server leaves it out of its chain (RFC 7671 §5.2.2 only says it SHOULD include it).
    anchors += [r.data for r in ta_records if r.selector == SELECTOR_CERT
                and r.mtype == MATCH_FULL]
    if anchors:
        return Verdict(NEEDS_ANCHOR, anchors=tuple(dict.fromkeys(anchors)))
    shown = ", ".join(str(r) for r in req.records)
    return Verdict(MISMATCH, reason=f"it matches none of the TLSA records ({shown})")


# -- a minimal DER reader: enough to find the SubjectPublicKeyInfo of a certificate ----------
def _element(data: bytes, pos: int) -> tuple[int, int, int]:
    """The tag, content start and end of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not expected in a certificate")
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, start, end


def subject_public_key_info(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an X.509 certificate (RFC 5280 §4.1)."""
    tag, start, _ = _element(cert_der, 0)  # Certificate ::= SEQUENCE
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, pos, tbs_end = _element(cert_der, start)  # tbsCertificate ::= SEQUENCE
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, _, end = _element(cert_der, pos)
    if tag == 0xA0:  # [0] EXPLICIT version, absent for v1
        pos = end
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo.
    for _ in range(5):
        _, _, pos = _element(cert_der, pos)
    tag, _, end = _element(cert_der, pos)
    if tag != 0x30 or end > tbs_end:
        raise ValueError("no SubjectPublicKeyInfo")
    return cert_der[pos:end]
