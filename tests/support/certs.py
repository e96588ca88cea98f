"""Test certificates made with ``cryptography``: a CA and server certificates it signs.

Usage::

    ca = make_ca(tmp_path)                                   # ca.cert_path: PEM to trust
    server = make_server_cert(tmp_path, ca, "mx1.example.test", ips=["127.0.0.2"])
    server.cert_path, server.key_path                         # for an ssl server context
    self_signed = make_self_signed(tmp_path, "mx1.example.test")
    chained = write_chain(tmp_path, server, ca)              # leaf then CA, in one PEM file
    der(ca), spki(server)                                     # bytes for TLSA records

Keys are EC P-256 (fast to generate). Certificates are valid from one day ago for 30 days.
Nothing here is fit for anything but tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert_path: str
    key_path: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def server_context(self) -> ssl.SSLContext:
        """An ssl context for a server presenting this certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> CertPair:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return CertPair(str(cert_path), str(key_path), cert, key)


def _builder(subject: x509.Name, issuer: x509.Name,
             key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)))


def make_ca(directory: str | Path, name: str = "Empath Test CA") -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(name), _name(name), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return _write(Path(directory), "ca", cert, key)


def _alt_names(hostname: str, ips: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return x509.SubjectAlternativeName(names)


def make_server_cert(directory: str | Path, ca: CertPair, hostname: str,
                     ips: list[str] | None = None) -> CertPair:
    """A certificate for ``hostname`` (and ``ips``) signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(hostname), ca.cert.subject, key)
            .add_extension(_alt_names(hostname, ips or []), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return _write(Path(directory), hostname, cert, key)


def make_self_signed(directory: str | Path, hostname: str,
                     ips: list[str] | None = None) -> CertPair:
    """A certificate for ``hostname`` that signs itself (verifies against nothing)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(hostname), _name(hostname), key)
            .add_extension(_alt_names(hostname, ips or []), critical=False)
            .sign(key, hashes.SHA256()))
    return _write(Path(directory), f"{hostname}.self", cert, key)


def write_chain(directory: str | Path, leaf: CertPair, *issuers: CertPair) -> CertPair:
    """``leaf`` with its issuers' certificates after it in one PEM file (what a server sends)."""
    path = Path(directory) / f"{Path(leaf.cert_path).stem}.chain.crt"
    path.write_bytes(b"".join(c.cert.public_bytes(serialization.Encoding.PEM)
                              for c in (leaf, *issuers)))
    return CertPair(str(path), leaf.key_path, leaf.cert, leaf.key)


def der(pair: CertPair) -> bytes:
    """The DER encoding of a certificate (TLSA selector 0)."""
    return pair.cert.public_bytes(serialization.Encoding.DER)


def spki(pair: CertPair) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate (TLSA selector 1)."""
    return pair.cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
