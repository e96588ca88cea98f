"""Outbound TLS policies against sinks with and without STARTTLS, with trusted, self-signed and
misnamed certificates; per-domain settings win over the global ones, both ways."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from empath.delivery.remote import RemoteTransport
from empath.delivery.state import DEFERRED, DELIVERED
from tests.support.certs import CertPair, make_ca, make_self_signed, make_server_cert
from tests.support.mailworld import MESSAGE, MailWorld, deliver, envelope, rcpt
from tests.support.sink import Behaviour

ZONE: dict[str, dict[str, Any]] = {
    "example.test": {"MX": [(10, "mx1.example.test")]},
    "other.test": {"MX": [(10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
}


@dataclasses.dataclass
class Certs:
    ca: CertPair
    good: CertPair  # mx1.example.test, signed by ca
    self_signed: CertPair  # mx1.example.test, signed by itself
    misnamed: CertPair  # elsewhere.test, signed by ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = make_ca(directory)
    return Certs(ca, make_server_cert(directory, ca, "mx1.example.test", ips=["127.0.0.2"]),
                 make_self_signed(directory, "mx1.example.test"),
                 make_server_cert(directory, ca, "elsewhere.test"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, ZONE, hosts=["127.0.0.2"]) as w:
        yield w


def serve(world: MailWorld, cert: CertPair | None, **changes: Any) -> Any:
    sink = world.sink("127.0.0.2")
    sink.behaviour = dataclasses.replace(
        Behaviour(), tls_cert=cert.cert_path if cert else None,
        tls_key=cert.key_path if cert else None, **changes)
    return sink


def tls_config(world: MailWorld, certs: Certs, policy: str = "opportunistic",
               accept_invalid: bool = False, **delivery: Any) -> Any:
    return world.config(tls={"default_policy": policy, "accept_invalid_certs": accept_invalid,
                             "ca_file": certs.ca.cert_path}, **delivery)


@pytest.mark.parametrize(("policy", "offered", "status", "encrypted"), [
    ("opportunistic", False, DELIVERED, False),
    ("opportunistic", True, DELIVERED, True),
    ("required", False, DEFERRED, False),
    ("required", True, DELIVERED, True),
    ("disabled", False, DELIVERED, False),
    ("disabled", True, DELIVERED, False),
])
def test_policy_against_server_with_and_without_starttls(
        world: MailWorld, certs: Certs, policy: str, offered: bool, status: str,
        encrypted: bool) -> None:
    sink = serve(world, certs.good if offered else None)
    out, info = deliver(tls_config(world, certs, policy), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert outcome.status == status
    assert (info["tls"] is not None) == encrypted
    assert (sink.sessions[0].tls is not None) == encrypted
    if encrypted:
        assert info["tls"]["version"].startswith("TLSv1.")
        assert info["tls"]["version"] == sink.sessions[0].tls["version"]
        assert info["tls"]["cipher"] == sink.sessions[0].tls["cipher"]
        [msg] = sink.wait_for_messages(1)
        assert msg.tls and msg.data == MESSAGE
        # RFC 3207 §4.2: EHLO again once the channel is encrypted.
        verbs = sink.sessions[0].verbs()
        assert verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
    if policy == "disabled":
        assert "STARTTLS" not in sink.sessions[0].verbs()
    if status == DEFERRED:
        assert outcome.enhanced == "4.7.4" and outcome.code == 451
        assert "MAIL" not in sink.sessions[0].verbs() and sink.messages == []


def test_domain_policy_wins_over_the_default(world: MailWorld, certs: Certs) -> None:
    sink = serve(world, certs.good)
    cfg = tls_config(world, certs, "disabled", domains={"example.test": {"tls": "required"}})
    out, info = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and info["tls"] is not None
    serve(world, None)
    cfg = tls_config(world, certs, "required", domains={"other.test": {"tls": "opportunistic"}})
    out, info = deliver(cfg, "other.test", [rcpt("u@other.test")], world.source(MESSAGE))
    assert out["u@other.test"].status == DELIVERED and info["tls"] is None
    out, _ = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DEFERRED  # the default still holds elsewhere
    assert len(sink.messages) == 2


def test_opportunistic_never_sends_in_plain_for_a_certificate_that_does_not_verify(
        world: MailWorld, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    """A self-signed certificate under the default policy: encrypted, unverified, recorded;
    never a reason to retry in plain text (issue: TLS downgrade on a bad certificate)."""
    sink = serve(world, certs.self_signed)
    with caplog.at_level(logging.WARNING, logger="empath.delivery.smtp"):
        out, info = deliver(tls_config(world, certs, "opportunistic"), "example.test",
                            [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED
    [msg] = sink.wait_for_messages(1)
    assert msg.tls  # the message itself arrived over TLS
    assert all("MAIL" not in s.verbs() or s.tls for s in sink.sessions)  # no plain transaction
    assert info["tls"]["verified"] == "no" and "self-signed" in info["tls"]["verify_error"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("certificate not verified" in m and "opportunistic" in m for m in logged)
    assert not any("retrying without TLS" in m or "TLS is required" in m for m in logged)


def test_opportunistic_verified_certificate_is_recorded(world: MailWorld,
                                                        certs: Certs) -> None:
    serve(world, certs.good)
    out, info = deliver(tls_config(world, certs, "opportunistic"), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED
    assert info["tls"]["verified"] == "yes" and "verify_error" not in info["tls"]


def test_opportunistic_falls_back_to_plain_only_when_the_handshake_cannot_complete(
        world: MailWorld, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    # STARTTLS offered and accepted, but the server has no certificate to shake hands with.
    sink = serve(world, None, advertise_starttls=True)
    with caplog.at_level(logging.WARNING, logger="empath.delivery.smtp"):
        out, info = deliver(tls_config(world, certs, "opportunistic"), "example.test",
                            [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and info["tls"] is None
    first, second = sink.sessions
    assert first.verbs() == ["EHLO", "STARTTLS"] and first.tls is None
    assert "STARTTLS" not in second.verbs() and "MAIL" in second.verbs()
    logged = [r.getMessage() for r in caplog.records]
    fallback = [m for m in logged if "retrying without TLS" in m]
    assert fallback and all("opportunistic" in m and "TLS is required" not in m
                            for m in fallback)


def test_required_refuses_a_certificate_that_does_not_verify(world: MailWorld,
                                                             certs: Certs) -> None:
    sink = serve(world, certs.self_signed)
    out, _ = deliver(tls_config(world, certs, "required"), "example.test",
                     [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.7.5")
    assert len(sink.sessions) == 1 and sink.messages == []  # never retried in plain


def test_required_checks_the_host_name(world: MailWorld, certs: Certs) -> None:
    sink = serve(world, certs.misnamed)  # signed by the trusted CA, for another name
    out, _ = deliver(tls_config(world, certs, "required"), "example.test",
                     [rcpt("u@example.test")], world.source(MESSAGE))
    assert (out["u@example.test"].status, out["u@example.test"].enhanced) == (DEFERRED,
                                                                              "4.7.5")
    assert sink.messages == []


def test_required_refused_starttls_reply_defers(world: MailWorld, certs: Certs) -> None:
    sink = serve(world, certs.good, starttls_reply=(454, "4.7.0 TLS not available"))
    out, _ = deliver(tls_config(world, certs, "required"), "example.test",
                     [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DEFERRED and sink.messages == []
    out, info = deliver(tls_config(world, certs, "opportunistic"), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and info["tls"] is None
    assert sink.sessions[-1].verbs()[:3] == ["EHLO", "STARTTLS", "MAIL"]  # same session


def test_replies_injected_before_the_handshake_are_refused(world: MailWorld,
                                                            certs: Certs) -> None:
    # A man in the middle appends a plain-text reply after 220 (the STARTTLS injection
    # class of bugs): a client must not read it as if it came over TLS.
    sink = serve(world, certs.good, starttls_inject=b"250 2.0.0 injected\r\n")
    out, _ = deliver(tls_config(world, certs, "required"), "example.test",
                     [rcpt("u@example.test")], world.source(MESSAGE))
    assert (out["u@example.test"].status, out["u@example.test"].enhanced) == (DEFERRED,
                                                                              "4.7.5")
    assert sink.messages == [] and sink.sessions[0].tls is None


@pytest.mark.parametrize(("global_accept", "domain_accept", "status"), [
    (True, None, DELIVERED),
    (False, None, DEFERRED),
    (True, False, DEFERRED),  # the domain's "verify" wins over a global "accept"
    (False, True, DELIVERED),  # the domain's "accept" wins over a global "verify"
])
def test_accept_invalid_certs_global_and_per_domain(
        world: MailWorld, certs: Certs, caplog: pytest.LogCaptureFixture,
        global_accept: bool, domain_accept: bool | None, status: str) -> None:
    sink = serve(world, certs.self_signed)
    domains = {"example.test": {"accept_invalid_certs": domain_accept}}
    cfg = tls_config(world, certs, "required", accept_invalid=global_accept, domains=domains)
    with caplog.at_level(logging.WARNING, logger="empath.delivery.tls"):
        out, info = deliver(cfg, "example.test", [rcpt("u@example.test")],
                            world.source(MESSAGE))
    assert out["u@example.test"].status == status
    warnings = [r for r in caplog.records if r.name == "empath.delivery.tls"]
    if status == DELIVERED:
        assert info["tls"] is not None and sink.wait_for_messages(1)[0].tls
        assert len(warnings) == 1 and "not verified" in warnings[0].getMessage()
    else:
        assert warnings == [] and sink.messages == []


def test_every_unverified_connection_is_logged(world: MailWorld, certs: Certs,
                                               caplog: pytest.LogCaptureFixture) -> None:
    serve(world, certs.self_signed)
    cfg = tls_config(world, certs, "required", accept_invalid=True,
                     connection_reuse={"max_idle": 0})
    source = world.source(MESSAGE)

    async def go() -> None:
        transport = RemoteTransport(cfg)
        for _ in range(3):
            out, _ = await transport.deliver("example.test", envelope(),
                                             [rcpt("u@example.test")], source)
            assert out["u@example.test"].status == DELIVERED
        await transport.close()

    with caplog.at_level(logging.WARNING, logger="empath.delivery.tls"):
        uvloop.run(go())
    assert len([r for r in caplog.records if r.name == "empath.delivery.tls"]) == 3


def test_tls_connection_is_reused(world: MailWorld, certs: Certs) -> None:
    sink = serve(world, certs.good)
    cfg = tls_config(world, certs, "required")
    source = world.source(MESSAGE)

    async def go() -> list[Any]:
        transport = RemoteTransport(cfg)
        infos = []
        for _ in range(2):
            _, info = await transport.deliver("example.test", envelope(),
                                              [rcpt("u@example.test")], source)
            infos.append(info["tls"])
        await transport.close()
        return infos

    infos = uvloop.run(go())
    assert all(infos) and len(sink.sessions) == 1 and len(sink.messages) == 2
    assert sink.sessions[0].verbs().count("STARTTLS") == 1
