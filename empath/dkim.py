"""DKIM signing of outbound mail (RFC 6376; ed25519-sha256 per RFC 8463), with dkimpy.

Empath signs once, at receipt, and the signature travels in the message data: the receiver
puts the ``DKIM-Signature:`` header at the top of the stored message before the 250, so every
later attempt (and every retry after a restart) sends the same signed bytes and the delivery
side needs to know nothing about DKIM. Mail is signed when its ``From:`` domain has a key in
``dkim.domains`` and the client may sign for that domain: a ``mynetworks`` client for every
listed domain, an authenticated user only for the domains it may send as (its own domain, or
the local domains for a bare user name: the rule of ``smtp.auth.require_sender_match``, applied
whether or not that key is on). Mail from strangers is never signed; a ``From:`` that cannot be
parsed names no domain and is not signed.

Key files: RSA as PEM (PKCS#1 or PKCS#8), ed25519 as the base64 of the 32-byte seed, which is
what ``empathctl dkim keygen`` writes. This module never touches the network or the spool.
"""

from __future__ import annotations

import base64
import email.utils
import os
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from empath.config.typed import DkimConfig

# RFC 6376 §5.4.1: the header fields worth signing.
DEFAULT_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to",
                   "in-reply-to", "references", "mime-version", "content-type",
                   "content-transfer-encoding")
HEADER_LIMIT = 256 * 1024  # where the From: header is looked for


class DkimError(Exception):
    """A key cannot be used (the message names the domain and the file)."""


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    private: bytes


def load_key(domain: str, selector: str, algorithm: str, path: str) -> SigningKey:
    try:
        with open(path, "rb") as fh:
            data = fh.read().strip()
    except OSError as exc:
        raise DkimError(f"dkim.domains.{domain}.key: {path}: {exc.strerror}") from None
    if algorithm == "ed25519-sha256":
        try:
            if len(base64.b64decode(data, validate=True)) != 32:
                raise ValueError
        except ValueError:
            raise DkimError(f"dkim.domains.{domain}.key: {path}: not a base64 ed25519 "
                            "seed (empathctl dkim keygen writes one)") from None
    elif b"PRIVATE KEY-----" not in data:
        raise DkimError(f"dkim.domains.{domain}.key: {path}: not a PEM private key")
    return SigningKey(domain, selector, algorithm, data)


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From: header address, lower-cased."""
    head = message[:HEADER_LIMIT]
    end = head.find(b"\r\n\r\n")
    head = head[: end + 2] if end >= 0 else head
    value: list[bytes] = []
    collecting = False
    for line in head.split(b"\r\n"):
        if collecting and line[:1] in (b" ", b"\t"):
            value.append(line)
            continue
        if collecting:
            break
        if line[:5].lower() == b"from:":
            value.append(line[5:])
            collecting = True
    if not value:
        return None
    text = b" ".join(value).decode("utf-8", "replace")
    try:
        addresses = email.utils.getaddresses([text])
    except (RecursionError, ValueError, IndexError):
        # The stdlib parser recurses per nested comment: thousands of "(" exhaust the stack.
        # A From: that cannot be read names no domain, so the message is not signed.
        return None
    if not addresses or "@" not in addresses[0][1]:
        return None
    return addresses[0][1].rpartition("@")[2].lower().rstrip(".")


class Signer:
    """The keys of ``dkim.domains``, loaded once per receiver process."""

    def __init__(self, cfg: DkimConfig) -> None:
        self.keys = {domain: load_key(domain, d.selector, d.algorithm, d.key)
                     for domain, d in cfg.domains.items()}
        header, body = cfg.canonicalization.split("/")
        self.canonicalize = (header.encode(), body.encode())
        self.headers = [h.encode() for h in (cfg.headers or DEFAULT_HEADERS)]

    def key_for(self, message: bytes) -> SigningKey | None:
        domain = from_domain(message)
        return self.keys.get(domain) if domain else None

    def sign(self, message: bytes, key: SigningKey) -> bytes:
        """The ``DKIM-Signature:`` header (CRLF-terminated) for ``message``."""
        header: bytes = dkim.sign(message, key.selector.encode(), key.domain.encode(),
                                  key.private, canonicalize=self.canonicalize,
                                  signature_algorithm=key.algorithm.encode(),
                                  include_headers=self.headers, linesep=b"\r\n")
        return header


def generate_key(algorithm: str, bits: int = 2048) -> tuple[bytes, str]:
    """A new private key (file contents) and the public part for the TXT record (p=)."""
    if algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.generate()
        seed = private.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
        return base64.b64encode(seed) + b"\n", base64.b64encode(public).decode()
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def txt_record(domain: str, selector: str, algorithm: str, public: str) -> str:
    """The zone-file line to publish, split into strings of at most 255 octets."""
    value = f"v=DKIM1; k={'ed25519' if algorithm == 'ed25519-sha256' else 'rsa'}; p={public}"
    chunks = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {chunks} )"


def write_private_key(path: str, data: bytes) -> None:
    """Create the key file 0600 (never overwrite an existing key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
