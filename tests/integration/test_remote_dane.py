"""DNSSEC states and DANE (RFC 7672) in RemoteTransport, against a signed zone served on
loopback, Debian's unbound validating it, and STARTTLS sinks whose certificates do and do not
match their TLSA records (tests/support/daneworld.py has the table of domains)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from empath.delivery.state import DEFERRED, DELIVERED
from tests.support.daneworld import DaneWorld
from tests.support.mailworld import MESSAGE, deliver, rcpt
from tests.support.unbound import UNBOUND


@pytest.fixture(scope="module")
def dane_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaneWorld]:
    if UNBOUND is None:
        pytest.fail("unbound is not installed: tools/test installs it (tools/install-test-deps, "
                    "Debian package unbound); the DANE tests need a validating resolver")
    with DaneWorld(tmp_path_factory.mktemp("dane")) as world:
        yield world


@pytest.fixture
def world(dane_world: DaneWorld) -> DaneWorld:
    dane_world.reset_sinks()
    return dane_world


def send(world: DaneWorld, domain: str, resolver: str = "unbound",
         **delivery: Any) -> tuple[Any, dict[str, Any]]:
    """Deliver one message to u@``domain``; its outcome and the route record."""
    out, info = deliver(world.config(resolver, **delivery), domain, [rcpt(f"u@{domain}")],
                        world.source(MESSAGE))
    return out[f"u@{domain}"], info


def tlsa(world: DaneWorld, host: str) -> str:
    return f"_{world.port}._tcp.{host}/TLSA"


# -- matching TLSA records: delivered over TLS -----------------------------------------------
@pytest.mark.parametrize("mode", ["log", "enforce"])
def test_dane_ee_match_delivers_over_tls(world: DaneWorld, mode: str) -> None:
    outcome, info = send(world, "ee.dane.test", dns={"dnssec": mode})
    assert outcome.status == DELIVERED
    assert info["tls"] is not None and info["dane"] == "verified"
    assert info["dane_match"].startswith("DANE-EE 3 1 1 ")
    assert info["dnssec"] == "secure"
    assert info["dnssec_lookups"] == {
        "ee.dane.test/MX": "secure", "mx-ee.dane.test/A/AAAA": "secure",
        tlsa(world, "mx-ee.dane.test"): "secure"}
    [msg] = world.sinks["mx-ee"].wait_for_messages(1)
    assert msg.tls and msg.data == MESSAGE
    # No Web PKI here: the certificate is self-signed and no ca_file is configured.
    assert world.sinks["mx-ee"].sessions[0].verbs()[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]


def test_dane_ta_match_verifies_the_chain_to_the_anchor(world: DaneWorld) -> None:
    outcome, info = send(world, "ta.dane.test", dns={"dnssec": "log"})
    assert outcome.status == DELIVERED and info["dane"] == "verified"
    assert info["dane_match"].startswith("DANE-TA 2 0 1 ")
    sink = world.sinks["mx-ta"]
    assert len(sink.wait_for_messages(1)) == 1
    # The first session only reads the chain; the second is verified by OpenSSL against the
    # CA certificate that matched, and carries the message.
    first, second = sink.sessions
    assert first.verbs() == ["EHLO", "STARTTLS", "QUIT"] and first.tls is not None
    assert "MAIL" in second.verbs() and second.tls is not None


def test_dane_ta_full_certificate_record_needs_no_chain(world: DaneWorld) -> None:
    # mx-taleaf sends its leaf alone; the 2 0 0 record holds the whole CA certificate.
    outcome, info = send(world, "taleaf.dane.test", dns={"dnssec": "log"})
    assert outcome.status == DELIVERED and info["dane_match"].startswith("DANE-TA 2 0 0 ")
    assert world.sinks["mx-taleaf"].wait_for_messages(1)[0].tls


def test_dane_ta_checks_the_mx_host_name(world: DaneWorld) -> None:
    # Signed by the TLSA-named CA, but for elsewhere.test (RFC 7672 §3.2.2).
    outcome, info = send(world, "taname.dane.test", dns={"dnssec": "log"})
    assert (outcome.status, outcome.code, outcome.enhanced) == (DEFERRED, 451, "4.7.5")
    assert "DANE-TA trust anchor" in outcome.text and info["dane"] == "failed"
    assert world.sinks["mx-taname"].messages == []


# -- mismatching TLSA records, or no STARTTLS: deferred with the reason ----------------------
@pytest.mark.parametrize("accept_invalid", [False, True])
def test_mismatch_defers_with_the_reason(world: DaneWorld, accept_invalid: bool) -> None:
    outcome, info = send(world, "bad.dane.test", dns={"dnssec": "enforce"},
                         tls={"accept_invalid_certs": accept_invalid})
    assert (outcome.status, outcome.code, outcome.enhanced) == (DEFERRED, 451, "4.7.5")
    assert "mx-bad.dane.test" in outcome.text
    assert "matches none of the TLSA records (3 1 1 " in outcome.text
    assert info["dane"] == "failed" and info["dnssec"] == "secure"
    sink = world.sinks["mx-bad"]
    assert [s.verbs() for s in sink.sessions] == [["EHLO", "STARTTLS"]]  # never in plain
    assert sink.messages == []


def test_mismatch_moves_on_to_the_next_mx_host(world: DaneWorld) -> None:
    outcome, info = send(world, "fallback.dane.test", dns={"dnssec": "log"})
    assert outcome.status == DELIVERED
    assert (info["server"], info["mx_index"], info["dane"]) == ("mx-ee.dane.test", 1,
                                                                 "verified")
    assert world.sinks["mx-bad"].messages == [] and world.sinks["mx-ee"].wait_for_messages(1)


def test_missing_starttls_is_a_temporary_failure(world: DaneWorld) -> None:
    outcome, info = send(world, "notls.dane.test", dns={"dnssec": "log"})
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.7.4")
    assert "does not offer STARTTLS" in outcome.text and info["dane"] == "failed"
    assert world.sinks["mx-notls"].messages == []


def test_unusable_tlsa_records_mean_tls_without_authentication(world: DaneWorld) -> None:
    outcome, info = send(world, "unusable.dane.test", dns={"dnssec": "log"})
    assert outcome.status == DELIVERED and info["tls"] is not None
    assert info["dane"] == "encrypted"
    outcome, _ = send(world, "unusable.dane.test", dns={"dnssec": "log"},
                      domains={"unusable.dane.test": {"tls": "dane"}})
    assert outcome.status == DEFERRED and "no TLSA record of" in outcome.text


# -- without validated TLSA records: the normal TLS policy ----------------------------------
def test_no_tlsa_records_leaves_the_normal_policy(world: DaneWorld) -> None:
    outcome, info = send(world, "notlsa.dane.test", dns={"dnssec": "enforce"})
    # opportunistic: the self-signed certificate does not verify; recorded, still encrypted.
    assert outcome.status == DELIVERED and info["tls"]["verified"] == "no"
    assert (info["dane"], info["dnssec"]) == ("none", "secure")
    assert info["dnssec_lookups"][tlsa(world, "mx-notlsa.dane.test")] == "secure"
    outcome, info = send(world, "notlsa.dane.test", dns={"dnssec": "enforce"},
                         domains={"notlsa.dane.test": {"tls": "dane"}})
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.7.5")
    assert "DANE is required for notlsa.dane.test" in outcome.text
    assert "no DNSSEC-validated TLSA records" in outcome.text


@pytest.mark.parametrize("mode", ["log", "enforce"])
def test_unsigned_zone_gets_the_normal_policy(world: DaneWorld, mode: str) -> None:
    # plain.dane.test is an unsigned delegation the resolver proves (NSEC, no DS bit): its
    # TLSA record is not validated and so not used, even under enforce.
    outcome, info = send(world, "plain.dane.test", dns={"dnssec": mode})
    assert outcome.status == DELIVERED and info["tls"]["verified"] == "no"
    assert (info["dnssec"], info["dane"]) == ("insecure", "none")
    assert info["dnssec_lookups"] == {"plain.dane.test/MX": "insecure",
                                      "mx.plain.dane.test/A/AAAA": "insecure"}
    outcome, _ = send(world, "plain.dane.test", dns={"dnssec": mode},
                      domains={"plain.dane.test": {"tls": "dane"}})
    assert outcome.status == DEFERRED and "not DNSSEC-validated" in outcome.text


# -- bogus and unvalidated answers ----------------------------------------------------------
@pytest.mark.parametrize(("mode", "domain_mode"), [("enforce", None), ("log", None),
                                                   ("off", "enforce")])
def test_bogus_signature_is_a_temporary_failure(world: DaneWorld, mode: str,
                                                domain_mode: str | None) -> None:
    outcome, info = send(world, "bogus.dane.test", dns={"dnssec": mode},
                         domains={"bogus.dane.test": {"dnssec": domain_mode}})
    assert (outcome.status, outcome.code, outcome.enhanced) == (DEFERRED, 451, "4.4.3")
    assert outcome.text == "DNSSEC validation of bogus.dane.test/MX failed (bogus answer)"
    assert info["dnssec"] == "bogus" and info["server"] is None
    assert info["dnssec_lookups"] == {"bogus.dane.test/MX": "bogus"}
    assert all(sink.sessions == [] for sink in world.sinks.values())


def test_bogus_mx_host_address_skips_the_host(world: DaneWorld) -> None:
    outcome, info = send(world, "boguship.dane.test", dns={"dnssec": "log"})
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.4.3")
    assert outcome.text == "DNSSEC validation of mx-bogus.dane.test/A failed (bogus answer)"
    assert (info["server"], info["dnssec"]) == ("mx-bogus.dane.test", "bogus")
    assert info["dnssec_lookups"]["mx-bogus.dane.test/A/AAAA"] == "bogus"
    outcome, info = send(world, "bogusfallback.dane.test", dns={"dnssec": "log"})
    assert outcome.status == DELIVERED
    assert (info["server"], info["dnssec"], info["dane"]) == ("mx-ee.dane.test", "secure",
                                                              "verified")
    assert len(world.sinks["mx-ee"].sessions) == 1  # the bogus host was never tried


def test_unvalidating_resolver_under_enforce_defers(world: DaneWorld) -> None:
    # The authoritative server as resolver: answers, but never validated (AD=0) and with no
    # validated denial of DS anywhere above them.
    outcome, info = send(world, "ee.dane.test", resolver="auth", dns={"dnssec": "enforce"})
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.4.3")
    assert "ee.dane.test/MX is not DNSSEC-validated" in outcome.text
    assert info["dnssec"] == "unvalidated"
    outcome, info = send(world, "ee.dane.test", resolver="auth", dns={"dnssec": "log"})
    # log records it and goes on, without DANE (nothing is validated): opportunistic TLS
    # records that the self-signed certificate does not verify and stays encrypted.
    assert outcome.status == DELIVERED and info["tls"]["verified"] == "no"
    assert (info["dnssec"], info["dane"]) == ("unvalidated", "none")


def test_off_consults_nothing(world: DaneWorld) -> None:
    outcome, info = send(world, "bad.dane.test", dns={"dnssec": "off"})
    assert outcome.status == DELIVERED  # opportunistic, the normal policy: TLS, unverified
    assert (info["dnssec"], info["dane"]) == ("off", "off") and "dnssec_lookups" not in info
    # A domain policy of dane needs the states: it is judged under log at least.
    outcome, info = send(world, "ee.dane.test", dns={"dnssec": "off"},
                         domains={"ee.dane.test": {"tls": "dane"}})
    assert outcome.status == DELIVERED and info["dane"] == "verified"


def test_disabled_policy_skips_dane(world: DaneWorld) -> None:
    outcome, info = send(world, "bad.dane.test", dns={"dnssec": "log"},
                         tls={"default_policy": "disabled"})
    assert outcome.status == DELIVERED and info["tls"] is None and info["dane"] == "off"
    assert tlsa(world, "mx-bad.dane.test") not in info["dnssec_lookups"]


def test_configured_next_hop_name_gets_dane_and_an_address_cannot(world: DaneWorld) -> None:
    # mx_override names a host: its name comes from the configuration, so its secure TLSA
    # records count although no MX lookup vouched for it.
    override = {"mx_override": f"mx-ee.dane.test:{world.port}"}
    outcome, info = send(world, "elsewhere.test", dns={"dnssec": "log"},
                         domains={"elsewhere.test": override})
    assert outcome.status == DELIVERED and info["dane"] == "verified"
    assert info["dnssec_lookups"] == {"mx-ee.dane.test/A/AAAA": "secure",
                                      tlsa(world, "mx-ee.dane.test"): "secure"}
    # An address has no TLSA records: mandatory DANE cannot be met.
    literal = {"mx_override": f"127.0.0.2:{world.port}", "tls": "dane"}
    outcome, info = send(world, "elsewhere.test", dns={"dnssec": "log"},
                         domains={"elsewhere.test": literal})
    assert outcome.status == DEFERRED and "127.0.0.2 is an address" in outcome.text
    assert world.sinks["mx-ee"].sessions[1:] == []
