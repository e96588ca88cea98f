"""DNSSEC-signed test zones and an authoritative server on loopback that serves them.

Zones are signed here with dnspython's DNSSEC support (``dns.dnssec.sign_zone`` builds the NSEC
chain and calls the signer on every RRset; ``make_ds`` and ``key_id``), one ECDSA P-256 key per
zone (flags 257), so a validating resolver (tests/support/unbound.py) can be given the top zone's
DS as its trust anchor and validate everything below it::

    top = make_zone("dane.test", {
        "@": {"MX": ["10 mx1.dane.test."]},
        "mx1": {"A": ["127.0.0.2"]},
        "_25._tcp.mx1": {"TLSA": ["3 1 1 <hex>"]},
    }, delegate={"plain.dane.test": "127.0.0.1"})   # an unsigned child: NS + glue, no DS
    child = make_zone("plain.dane.test", {...}, signed=False)
    break_signature(top, "bogus.dane.test", "MX")   # that RRset now fails validation
    with SignedDNSServer([top, child]) as server:   # 127.0.0.1, one free port, UDP and TCP
        top.trust_anchor()                          # 'dane.test. 300 IN DS 12345 13 2 ...'

Answers follow RFC 4035 §3.1 as far as the tests need: records with their RRSIGs (when the
query sets DO), NODATA with the SOA and the name's NSEC, NXDOMAIN with the NSEC covering the
name and the one covering the wildcard of its closest encloser, referrals to a child zone
(NS, glue, and the DS or the NSEC proving there is none), and DS questions for a child's apex
answered from the parent. Names outside every zone are REFUSED.

The signatures themselves (RFC 4034 §3.1.8.1, RFC 6605) are made here with ``cryptography``:
dnspython's own ``sign``/``make_dnskey`` want a newer ``cryptography`` than the test extra
allows, while its zone signing, NSEC chain and DS code need none. The socket plumbing, query
counters and the ``servfail``/``silent`` sets are those of tests/support/dnsserver.py.
"""

from __future__ import annotations

import bisect
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.transaction
import dns.zone
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.dnsserver import DNSServer

TTL = 300
ALGORITHM = dns.dnssec.Algorithm.ECDSAP256SHA256


@dataclass
class TestZone:
    origin: dns.name.Name
    zone: dns.zone.Zone
    dnskey: Any = None  # None: unsigned
    _nsec_names: list[dns.name.Name] = field(default_factory=list)

    @property
    def signed(self) -> bool:
        return self.dnskey is not None

    def ds(self) -> dns.rrset.RRset:
        """The DS RRset of this zone's key, for its parent or a trust anchor."""
        ds = dns.dnssec.make_ds(self.origin, self.dnskey, "SHA256")
        return dns.rrset.from_rdata(self.origin, TTL, ds)

    def trust_anchor(self) -> str:
        return self.ds().to_text()

    def index(self) -> None:
        self._nsec_names = sorted(name for name, node in self.zone.nodes.items()
                                  if node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NSEC))

    def covering_nsec(self, name: dns.name.Name) -> dns.name.Name | None:
        """The owner of the NSEC whose span holds ``name`` (canonical order, RFC 4034 §6.1)."""
        if not self._nsec_names:
            return None
        i = bisect.bisect_right(self._nsec_names, name) - 1
        return self._nsec_names[i]  # i == -1: the last NSEC, which wraps to the apex


def make_zone(origin: str, records: dict[str, dict[str, list[str]]], *, signed: bool = True,
              delegate: dict[str, str] | None = None,
              child_ds: dict[str, dns.rrset.RRset] | None = None) -> TestZone:
    """A zone with an SOA and NS at its apex, ``records`` (names relative to ``origin``, "@"
    for the apex; record texts as in a zone file), and a delegation for each child in
    ``delegate`` (child name -> address of its server: NS ns.<child> and glue), with the
    child's DS from ``child_ds`` when it is signed. Signed unless ``signed`` is False."""
    apex = dns.name.from_text(origin)
    lines = [f"@ {TTL} IN SOA ns.{apex} hostmaster.{apex} 1 3600 600 86400 30",
             f"@ {TTL} IN NS ns.{apex}", f"ns {TTL} IN A 127.0.0.1"]
    for name, types in records.items():
        for rdtype, texts in types.items():
            lines += [f"{name} {TTL} IN {rdtype} {text}" for text in texts]
    for child, address in (delegate or {}).items():
        child_name = dns.name.from_text(child)
        lines += [f"{child_name} {TTL} IN NS ns.{child_name}",
                  f"ns.{child_name} {TTL} IN A {address}"]
        ds = (child_ds or {}).get(child)
        if ds is not None:
            lines += [f"{child_name} {TTL} IN DS {rd.to_text()}" for rd in ds]
    zone = dns.zone.from_text("\n".join(lines) + "\n", origin=apex, relativize=False,
                              check_origin=True)
    result = TestZone(apex, zone)
    if signed:
        private = ec.generate_private_key(ec.SECP256R1())
        dnskey = _dnskey(private)
        signer = _Signer(private, dnskey, apex)
        dns.dnssec.sign_zone(zone, keys=[(private, dnskey)], rrset_signer=signer)
        result.dnskey = dnskey
    result.index()
    return result


def _dnskey(private: ec.EllipticCurvePrivateKey) -> Any:
    """RFC 6605 §4: the public key of ECDSAP256SHA256 is X | Y, 32 octets each."""
    numbers = private.public_key().public_numbers()
    key = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    return dns.rdtypes.ANY.DNSKEY.DNSKEY(dns.rdataclass.IN, dns.rdatatype.DNSKEY, 257, 3,
                                         ALGORITHM, key)


class _Signer:
    """Adds the RRSIG of one RRset (called by ``sign_zone`` for every RRset to sign)."""

    def __init__(self, private: ec.EllipticCurvePrivateKey, dnskey: Any,
                 signer: dns.name.Name) -> None:
        self.private, self.dnskey, self.signer = private, dnskey, signer
        now = int(time.time())
        self.inception, self.expiration = now - 3600, now + 30 * 86400

    def __call__(self, txn: dns.transaction.Transaction, rrset: dns.rrset.RRset) -> None:
        labels = len(rrset.name) - 1 - (1 if rrset.name.is_wild() else 0)
        rrsig = dns.rdtypes.ANY.RRSIG.RRSIG(
            dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype, ALGORITHM, labels,
            rrset.ttl, self.expiration, self.inception, dns.dnssec.key_id(self.dnskey),
            self.signer, b"")
        # RFC 4034 §3.1.8.1: the RRSIG RDATA without its signature, then the RRset in
        # canonical form (lower-case owner, records in canonical order).
        data = rrsig.to_digestable(self.signer)
        owner = rrset.name.canonicalize().to_wire()
        fixed = struct.pack("!HHI", rrset.rdtype, rrset.rdclass, rrset.ttl)
        for rdata in sorted(rd.to_digestable(self.signer) for rd in rrset):
            data += owner + fixed + struct.pack("!H", len(rdata)) + rdata
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        txn.add(rrset.name, rrset.ttl, rrsig.replace(signature=signature))


def break_signature(zone: TestZone, name: str, rdtype: str) -> None:
    """Corrupt the RRSIG over ``name``/``rdtype``: a validating resolver finds it bogus."""
    owner = dns.name.from_text(name)
    covered = dns.rdatatype.from_text(rdtype)
    with zone.zone.writer() as txn:
        sigs = txn.get(owner, dns.rdatatype.RRSIG, covered)
        assert sigs, f"no RRSIG over {name}/{rdtype}"
        broken = [rd.replace(signature=bytes(b ^ 0x5A for b in rd.signature)) for rd in sigs]
        txn.replace(owner, dns.rrset.from_rdata_list(owner, sigs.ttl, broken))


class SignedDNSServer(DNSServer):
    """An authoritative server for several ``TestZone``s on one loopback port."""

    def __init__(self, zones: list[TestZone], *, host: str = "127.0.0.1") -> None:
        super().__init__({}, host=host, origins=tuple(z.origin.to_text() for z in zones))
        self.zones = sorted(zones, key=lambda z: len(z.origin), reverse=True)

    # -- which zone answers ---------------------------------------------------------------
    def _zone_for(self, qname: dns.name.Name, rdtype: int) -> TestZone | None:
        candidates = [z for z in self.zones if qname.is_subdomain(z.origin)]
        if rdtype == dns.rdatatype.DS and candidates and candidates[0].origin == qname:
            candidates = candidates[1:]  # RFC 4035 §3.1.4.1: DS comes from the parent side
        return candidates[0] if candidates else None

    @staticmethod
    def _delegation(zone: TestZone, qname: dns.name.Name) -> dns.name.Name | None:
        name = qname
        while name != zone.origin and name.is_subdomain(zone.origin):
            node = zone.zone.get_node(name)
            if node is not None and node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS):
                return name
            name = name.parent()
        return None

    # -- building the response ------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        key = qname.to_text().rstrip(".").lower()
        type_text = dns.rdatatype.to_text(rdtype)
        with self._lock:
            self.queries[(key, type_text)] += 1
        if key in self.silent or f"{key}/{type_text}" in self.silent:
            return None
        if key in self.servfail or f"{key}/{type_text}" in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        zone = self._zone_for(qname, rdtype)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        dnssec = bool(query.ednsflags & dns.flags.DO)
        if dnssec:
            response.want_dnssec(True)  # RFC 3225 §3: DO is copied into the response
        _Answer(zone, response, dnssec).fill(qname, rdtype, self._delegation(zone, qname))
        return response.to_wire()


class _Answer:
    """The sections of one response from one zone."""

    def __init__(self, zone: TestZone, response: dns.message.Message, dnssec: bool) -> None:
        self.zone, self.response, self.dnssec = zone, response, dnssec

    def rrset(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        node = self.zone.zone.get_node(name)
        rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype) if node else None
        if not rdataset:
            return None
        return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))

    def add(self, section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: int) -> bool:
        rrset = self.rrset(name, rdtype)
        if rrset is None:
            return False
        if rrset not in section:
            section.append(rrset)
        if self.dnssec and self.zone.signed:
            node = self.zone.zone.get_node(name)
            assert node is not None
            sigs = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype)
            if sigs:
                rrsig = dns.rrset.from_rdata_list(name, sigs.ttl, list(sigs))
                if rrsig not in section:
                    section.append(rrsig)
        return True

    def deny(self, name: dns.name.Name | None) -> None:
        """The SOA and, for a signed zone, the NSEC at or covering ``name``."""
        authority = self.response.authority
        self.add(authority, self.zone.origin, dns.rdatatype.SOA)
        if name is not None and self.dnssec and self.zone.signed:
            owner = self.zone.covering_nsec(name)
            if owner is not None:
                self.add(authority, owner, dns.rdatatype.NSEC)

    def fill(self, qname: dns.name.Name, rdtype: int, cut: dns.name.Name | None) -> None:
        response = self.response
        if cut is not None and not (rdtype == dns.rdatatype.DS and qname == cut):
            # A referral (not authoritative): the child's NS, its DS or the proof of none.
            self.add(response.authority, cut, dns.rdatatype.NS)
            if self.dnssec and self.zone.signed and not self.add(
                    response.authority, cut, dns.rdatatype.DS):
                self.add(response.authority, cut, dns.rdatatype.NSEC)
            for ns in self.rrset(cut, dns.rdatatype.NS) or ():
                self.add(response.additional, ns.target, dns.rdatatype.A)
            return
        response.flags |= dns.flags.AA
        node = self.zone.zone.get_node(qname)
        if node is not None:
            if not self.add(response.answer, qname, rdtype):
                self.deny(qname)  # NODATA: the name's own NSEC lists what it has
            return
        if any(name.is_subdomain(qname) for name in self.zone.zone.nodes):
            self.deny(qname)  # an empty non-terminal: NODATA, proven by the covering NSEC
            return
        response.set_rcode(dns.rcode.NXDOMAIN)
        self.deny(qname)
        encloser = qname.parent()
        while encloser != self.zone.origin and not any(
                name.is_subdomain(encloser) for name in self.zone.zone.nodes):
            encloser = encloser.parent()
        # RFC 4035 §3.1.3.2: and no wildcard at the closest encloser could have answered.
        self.deny(dns.name.from_text("*", encloser))
