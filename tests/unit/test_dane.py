"""TLSA matching and chain verdicts (empath/delivery/dane.py), and the DNSSEC modes and states
(empath/delivery/dnssec.py), with certificates from tests/support/certs.py and no network."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from empath.delivery import dnssec
from empath.delivery.dane import (
    ENCRYPTED,
    MISMATCH,
    NEEDS_ANCHOR,
    VERIFIED,
    TLSARecord,
    check_chain,
    requirement,
    subject_public_key_info,
)
from empath.delivery.errors import TemporaryError
from tests.support.certs import CertPair, der, make_ca, make_self_signed, make_server_cert, spki


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPair]:
    d = tmp_path_factory.mktemp("certs")
    ca = make_ca(d)
    return {"ca": ca, "leaf": make_server_cert(d, ca, "mx.example.test"),
            "self": make_self_signed(d, "mx.example.test"),
            "other": make_self_signed(d, "other.example.test")}


def record(usage: int, selector: int, mtype: int, content: bytes) -> TLSARecord:
    digest = {0: lambda b: b, 1: lambda b: hashlib.sha256(b).digest(),
              2: lambda b: hashlib.sha512(b).digest()}[mtype](content)
    return TLSARecord(usage, selector, mtype, digest)


# -- the DER reader ---------------------------------------------------------------------------
def test_spki_is_cut_out_of_ec_certificates(certs: dict[str, CertPair]) -> None:
    for pair in certs.values():
        assert subject_public_key_info(der(pair)) == spki(pair)


def test_spki_is_cut_out_of_an_rsa_certificate_with_long_lengths() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    want = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert subject_public_key_info(cert.public_bytes(serialization.Encoding.DER)) == want


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x82\xff\xff", b"\x04\x00",
                                  b"\x30\x03\x02\x01\x01"])
def test_spki_of_junk_is_a_value_error(junk: bytes) -> None:
    with pytest.raises(ValueError):
        subject_public_key_info(junk)


# -- records ----------------------------------------------------------------------------------
@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_record_matches_by_selector_and_matching_type(certs: dict[str, CertPair],
                                                      selector: int, mtype: int) -> None:
    leaf = certs["self"]
    content = der(leaf) if selector == 0 else spki(leaf)
    rec = record(3, selector, mtype, content)
    assert rec.usable and rec.matches(der(leaf))
    assert not rec.matches(der(certs["other"]))
    assert not rec.matches(b"not a certificate")


def test_only_dane_ta_and_dane_ee_records_are_usable(certs: dict[str, CertPair]) -> None:
    key = spki(certs["self"])
    records = [record(0, 1, 1, key), record(1, 1, 1, key), TLSARecord(3, 2, 1, b"x"),
               TLSARecord(3, 1, 3, b"x"), record(3, 1, 1, key), record(3, 1, 1, key)]
    req = requirement("MX.Example.Test.", records)
    assert req.host == "mx.example.test" and req.records == (record(3, 1, 1, key),)
    assert not requirement("mx", records[:4]).authenticates
    assert str(record(3, 1, 1, key)).startswith("3 1 1 ") and str(records[0]).endswith("...")


# -- verdicts on a chain ----------------------------------------------------------------------
def test_dane_ee_matches_the_leaf_only(certs: dict[str, CertPair]) -> None:
    req = requirement("mx.example.test", [record(3, 1, 1, spki(certs["self"]))])
    verdict = check_chain(req, [der(certs["self"])], anchored=False)
    assert verdict.status == VERIFIED and verdict.description.startswith("DANE-EE 3 1 1")
    # The same key further up the chain is not the leaf.
    wrong = check_chain(req, [der(certs["other"]), der(certs["self"])], anchored=False)
    assert wrong.status == MISMATCH and "3 1 1" in wrong.reason


def test_dane_ta_asks_for_a_verified_handshake(certs: dict[str, CertPair]) -> None:
    ca, leaf = der(certs["ca"]), der(certs["leaf"])
    req = requirement("mx.example.test", [record(2, 0, 1, ca)])
    verdict = check_chain(req, [leaf, ca], anchored=False)
    assert verdict.status == NEEDS_ANCHOR and verdict.anchors == (ca,)
    # The leaf itself is no trust anchor, and a chain without the CA has nothing to anchor.
    assert check_chain(req, [leaf], anchored=False).status == MISMATCH
    # After OpenSSL verified the chain against that anchor:
    verified = check_chain(req, [leaf, ca], anchored=True)
    assert verified.status == VERIFIED and verified.description.startswith("DANE-TA 2 0 1")
    assert check_chain(req, [leaf], anchored=True).status == MISMATCH


def test_dane_ta_full_certificate_record_is_an_anchor_without_the_chain(
        certs: dict[str, CertPair]) -> None:
    ca, leaf = der(certs["ca"]), der(certs["leaf"])
    req = requirement("mx.example.test", [record(2, 0, 0, ca), record(2, 1, 1, spki(
        certs["ca"]))])
    verdict = check_chain(req, [leaf], anchored=False)
    assert verdict.status == NEEDS_ANCHOR and verdict.anchors == (ca,)
    both = check_chain(req, [leaf, ca], anchored=False)
    assert both.anchors == (ca,)  # the same certificate once


def test_unusable_only_means_encrypted_and_no_certificate_is_a_mismatch(
        certs: dict[str, CertPair]) -> None:
    unusable = requirement("mx", [record(1, 1, 1, spki(certs["self"]))])
    assert check_chain(unusable, [], anchored=False).status == ENCRYPTED
    usable = requirement("mx", [record(3, 1, 1, spki(certs["self"]))])
    assert check_chain(usable, [], anchored=False).reason == "the server sent no certificate"


# -- DNSSEC modes and states ------------------------------------------------------------------
class Domain:
    def __init__(self, dnssec: str | None = None, tls: str | None = None) -> None:
        self.dnssec, self.tls = dnssec, tls


class Cfg:
    def __init__(self, mode: str, policy: str = "opportunistic",
                 domains: dict[str, Domain] | None = None) -> None:
        self.dns = type("D", (), {"dnssec": mode})()
        self.tls = type("T", (), {"default_policy": policy})()
        self.domains = domains or {}


def test_mode_for_a_domain() -> None:
    cfg = Cfg("log", domains={"strict.test": Domain("enforce"), "lax.test": Domain("off"),
                              "dane.test": Domain(tls="dane")})
    assert dnssec.mode_for(cfg, "Strict.Test") == "enforce"
    assert dnssec.mode_for(cfg, "lax.test") == "off"
    assert dnssec.mode_for(cfg, "other.test") == "log"
    off = Cfg("off", domains={"dane.test": Domain(tls="dane"),
                              "nodane.test": Domain(tls="dane", dnssec="off")})
    assert dnssec.mode_for(off, "dane.test") == "log"  # DANE needs the states
    assert dnssec.mode_for(off, "nodane.test") == "log"
    assert dnssec.mode_for(Cfg("off", "dane"), "any.test") == "log"


def test_weakest_state_wins() -> None:
    assert dnssec.weakest(["secure", "insecure", "secure"]) == "insecure"
    assert dnssec.weakest(["secure", "bogus", "unvalidated"]) == "bogus"
    assert dnssec.weakest([]) == dnssec.NO_DNS


class Answer:
    def __init__(self, secure: bool, literal: bool = False) -> None:
        self.secure, self.literal = secure, literal


class Resolver:
    def __init__(self, proof: bool | None) -> None:
        self.proof = proof
        self.walked: list[str] = []

    async def proven_insecure(self, name: str) -> bool | None:
        self.walked.append(name)
        return self.proof


async def answer(value: Any) -> Any:
    return value


@pytest.mark.parametrize(("mode", "secure", "proof", "state", "raises"), [
    ("log", True, None, "secure", False),
    ("log", False, True, "insecure", False),
    ("log", False, False, "unvalidated", False),
    ("log", False, None, "unvalidated", False),
    ("enforce", True, None, "secure", False),
    ("enforce", False, True, "insecure", False),
    ("enforce", False, None, "unvalidated", True),
    ("off", False, None, "off", False),
])
def test_observe_judges_and_enforces(mode: str, secure: bool, proof: bool | None, state: str,
                                     raises: bool) -> None:
    resolver = Resolver(proof)
    security = dnssec.RouteSecurity(resolver, mode)

    async def go() -> str:
        _, got = await security.observe("example.test", "MX", answer(Answer(secure)))
        return got

    if raises:
        with pytest.raises(TemporaryError) as err:
            asyncio.run(go())
        assert err.value.enhanced == "4.4.3" and "example.test/MX" in err.value.text
    else:
        assert asyncio.run(go()) == state
    assert security.lookups == ({} if mode == "off" else {"example.test/MX": state})
    assert resolver.walked == ([] if secure or mode == "off" else ["example.test"])


def test_observe_records_bogus_and_skips_literals() -> None:
    security = dnssec.RouteSecurity(Resolver(None), "log")

    async def bogus() -> Any:
        err = TemporaryError.make("dnssec_bogus", name="x.test/MX")
        err.dnssec = "bogus"  # type: ignore[attr-defined]
        raise err

    with pytest.raises(TemporaryError):
        asyncio.run(security.observe("x.test", "MX", bogus()))
    _, state = asyncio.run(security.observe("127.0.0.9", "A/AAAA", answer(Answer(False, True))))
    assert state == dnssec.NO_DNS
    assert security.lookups == {"x.test/MX": "bogus"}
    assert security.route_state(list(security.lookups.values())) == "bogus"
