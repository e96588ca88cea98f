"""MTA-STS (RFC 8461) through RemoteTransport: the _mta-sts TXT record from the loopback DNS
server, the policy from a loopback HTTPS server whose certificate a test CA signed, and SMTP
sinks with and without STARTTLS and valid certificates."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from empath.delivery.remote import RemoteTransport
from empath.delivery.state import DEFERRED, DELIVERED
from empath.spool import Spool, read_envelope
from tests.support.certs import CertPair, make_ca, make_self_signed, make_server_cert
from tests.support.mailworld import MESSAGE, MailWorld, deliver, envelope, rcpt
from tests.support.sink import Behaviour
from tests.support.stsserver import PolicyServer

POLICY_HOST = "127.0.0.7"


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx or
                                                   ("mx1.example.test",)),
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


def zone() -> dict[str, dict[str, Any]]:
    return {
        "example.test": {"MX": [(10, "mx1.example.test")]},
        "_mta-sts.example.test": {"TXT": ["v=STSv1; id=20240101T000000;"], "ttl": 1},
        "mta-sts.example.test": {"A": [POLICY_HOST]},
        "nosts.test": {"MX": [(10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
    }


@dataclasses.dataclass
class Certs:
    ca: CertPair
    good: CertPair  # mx1.example.test, signed by ca
    self_signed: CertPair  # mx1.example.test, signed by itself
    policy_host: CertPair  # mta-sts.example.test, signed by ca


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = make_ca(directory)
    return Certs(ca, make_server_cert(directory, ca, "mx1.example.test", ips=["127.0.0.2"]),
                 make_self_signed(directory, "mx1.example.test"),
                 make_server_cert(directory, ca, "mta-sts.example.test"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[MailWorld]:
    with MailWorld(tmp_path, zone(), hosts=["127.0.0.2"]) as w:
        yield w


@pytest.fixture
def sts(certs: Certs) -> Iterator[PolicyServer]:
    server = PolicyServer(host=POLICY_HOST)
    server.add("example.test", policy(), certs.policy_host)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serve(world: MailWorld, cert: CertPair | None, **changes: Any) -> Any:
    sink = world.sink("127.0.0.2")
    sink.behaviour = dataclasses.replace(
        Behaviour(), tls_cert=cert.cert_path if cert else None,
        tls_key=cert.key_path if cert else None, **changes)
    return sink


def sts_config(world: MailWorld, certs: Certs, server: PolicyServer, **delivery: Any) -> Any:
    delivery.setdefault("tls", {"default_policy": "opportunistic",
                                "ca_file": certs.ca.cert_path})
    return world.config(mta_sts={"enabled": True, "port": server.port,
                                 "ca_file": certs.ca.cert_path}, **delivery)


def test_enforce_with_a_matching_mx_and_a_valid_certificate_delivers_over_tls(
        world: MailWorld, certs: Certs, sts: PolicyServer) -> None:
    sink = serve(world, certs.good)
    out, info = deliver(sts_config(world, certs, sts), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED
    assert info["tls"] is not None and sink.wait_for_messages(1)[0].tls
    assert (info["mta_sts"], info["mta_sts_result"]) == ("enforce", "verified")
    assert "mta_sts_failure" not in info
    assert sts.requests("example.test") == 1


def test_wildcard_mx_pattern_matches_one_label(world: MailWorld, certs: Certs,
                                               sts: PolicyServer) -> None:
    sts.add("example.test", policy("enforce", "*.example.test"), certs.policy_host)
    serve(world, certs.good)
    out, info = deliver(sts_config(world, certs, sts), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and info["mta_sts_result"] == "verified"


def test_enforce_defers_when_no_mx_is_in_the_policy(world: MailWorld, certs: Certs,
                                                    sts: PolicyServer) -> None:
    sts.add("example.test", policy("enforce", "mx.elsewhere.test", "*.mx.example.test"),
            certs.policy_host)
    sink = serve(world, certs.good)
    out, info = deliver(sts_config(world, certs, sts), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert outcome.status == DEFERRED and "MTA-STS" in outcome.text
    assert "mx1.example.test" in outcome.text and outcome.enhanced == "4.7.0"
    assert sink.sessions == []  # never connected
    assert (info["mta_sts"], info["mta_sts_result"]) == ("enforce", "failed")
    assert "not in its MTA-STS policy" in info["mta_sts_failure"]


def test_enforce_defers_when_the_server_offers_no_starttls(world: MailWorld, certs: Certs,
                                                           sts: PolicyServer) -> None:
    sink = serve(world, None)
    out, info = deliver(sts_config(world, certs, sts), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.7.4")
    assert "MTA-STS" in outcome.text and "STARTTLS" in outcome.text
    assert "MAIL" not in sink.sessions[0].verbs() and sink.messages == []
    assert info["mta_sts_result"] == "failed"


@pytest.mark.parametrize("accept_invalid", [False, True])
def test_enforce_refuses_a_certificate_that_does_not_verify(
        world: MailWorld, certs: Certs, sts: PolicyServer, accept_invalid: bool) -> None:
    # Even accept_invalid_certs does not loosen an enforced policy.
    sink = serve(world, certs.self_signed)
    cfg = sts_config(world, certs, sts, tls={"default_policy": "opportunistic",
                                             "ca_file": certs.ca.cert_path,
                                             "accept_invalid_certs": accept_invalid})
    out, _ = deliver(cfg, "example.test", [rcpt("u@example.test")], world.source(MESSAGE))
    outcome = out["u@example.test"]
    assert (outcome.status, outcome.enhanced) == (DEFERRED, "4.7.5")
    assert "MTA-STS" in outcome.text
    assert len(sink.sessions) == 1 and sink.messages == []  # never retried in plain


def test_testing_mode_delivers_and_records_what_would_fail(
        world: MailWorld, certs: Certs, sts: PolicyServer,
        caplog: pytest.LogCaptureFixture) -> None:
    sts.add("example.test", policy("testing"), certs.policy_host)
    sink = serve(world, certs.self_signed)
    with caplog.at_level(logging.WARNING, logger="empath.delivery.mtasts"):
        out, info = deliver(sts_config(world, certs, sts), "example.test",
                            [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and sink.wait_for_messages(1)
    assert (info["mta_sts"], info["mta_sts_result"]) == ("testing", "failed")
    # Opportunistic TLS stays encrypted with a certificate that does not verify (never
    # plain); the policy in testing mode records what enforce would have refused.
    assert sink.messages[0].tls
    assert "certificate of mx1.example.test did not verify" in info["mta_sts_failure"]
    assert "self-signed" in info["mta_sts_failure"]
    assert any("mode testing" in r.getMessage() for r in caplog.records)


def test_testing_mode_with_a_good_server_is_verified(world: MailWorld, certs: Certs,
                                                     sts: PolicyServer) -> None:
    sts.add("example.test", policy("testing"), certs.policy_host)
    serve(world, certs.good)
    out, info = deliver(sts_config(world, certs, sts), "example.test",
                        [rcpt("u@example.test")], world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED
    assert (info["mta_sts"], info["mta_sts_result"]) == ("testing", "verified")


def test_policy_is_cached_and_fetched_again_when_its_id_changes(
        world: MailWorld, certs: Certs, sts: PolicyServer) -> None:
    serve(world, certs.good)
    cfg = sts_config(world, certs, sts)
    source = world.source(MESSAGE)

    async def go(n: int, transport: RemoteTransport) -> list[str]:
        results = []
        for _ in range(n):
            out, info = await transport.deliver("example.test", envelope(),
                                                [rcpt("u@example.test")], source)
            results.append((out["u@example.test"].status, info["mta_sts"]))
        return results

    async def scenario() -> None:
        transport = RemoteTransport(cfg)
        try:
            assert await go(3, transport) == [(DELIVERED, "enforce")] * 3
            assert sts.requests("example.test") == 1
            # A new id in DNS (its TTL is 1 s): the next message fetches the policy again.
            world.dns.set("_mta-sts.example.test", "TXT", ["v=STSv1; id=2;"], ttl=1)
            sts.add("example.test", policy("testing"), certs.policy_host)
            world.dns.reset_counts()
            for _ in range(40):  # the old TXT answer leaves the cache within a second or so
                if (await go(1, transport))[0][1] == "testing":
                    break
                await asyncio.sleep(0.1)
            assert sts.requests("example.test") == 2
        finally:
            await transport.close()

    uvloop.run(scenario())


def test_without_a_txt_record_the_normal_policy_applies(world: MailWorld, certs: Certs,
                                                        sts: PolicyServer) -> None:
    sink = serve(world, None)  # no STARTTLS: fine without MTA-STS (opportunistic)
    out, info = deliver(sts_config(world, certs, sts), "nosts.test", [rcpt("u@nosts.test")],
                        world.source(MESSAGE))
    assert out["u@nosts.test"].status == DELIVERED and sink.wait_for_messages(1)
    assert info["mta_sts"] == "no-policy" and "mta_sts_result" not in info
    assert world.dns.count("_mta-sts.nosts.test", "TXT") == 1


@pytest.mark.parametrize(("content_type", "status"), [("text/html", 200), ("text/plain", 404)])
def test_a_policy_that_cannot_be_fetched_is_no_policy_and_not_refetched_at_once(
        world: MailWorld, certs: Certs, sts: PolicyServer, content_type: str,
        status: int) -> None:
    sts.add("example.test", policy(), certs.policy_host, content_type=content_type,
            status=status)
    serve(world, None)
    cfg = sts_config(world, certs, sts)
    source = world.source(MESSAGE)

    async def go() -> list[tuple[str, str]]:
        transport = RemoteTransport(cfg)
        out = []
        for _ in range(2):
            res, info = await transport.deliver("example.test", envelope(),
                                                [rcpt("u@example.test")], source)
            out.append((res["u@example.test"].status, info["mta_sts"]))
        await transport.close()
        return out

    assert uvloop.run(go()) == [(DELIVERED, "no-policy")] * 2
    assert sts.requests("example.test") == 1


def test_policy_host_certificate_must_verify(world: MailWorld, certs: Certs,
                                             tmp_path: Path) -> None:
    other_ca = make_ca(tmp_path / "other")
    server = PolicyServer(host=POLICY_HOST)
    server.add("example.test", policy(), make_server_cert(tmp_path / "other", other_ca,
                                                           "mta-sts.example.test"))
    server.start()
    try:
        serve(world, None)
        out, info = deliver(sts_config(world, certs, server), "example.test",
                            [rcpt("u@example.test")], world.source(MESSAGE))
    finally:
        server.stop()
    assert out["u@example.test"].status == DELIVERED and info["mta_sts"] == "no-policy"


def test_configured_next_hop_and_disabled_tls_skip_mta_sts(world: MailWorld, certs: Certs,
                                                           sts: PolicyServer) -> None:
    serve(world, None)
    hop = f"127.0.0.2:{world.port}"
    for extra in ({"domains": {"example.test": {"mx_override": hop}}},
                  {"domains": {"example.test": {"tls": "disabled"}}}):
        out, info = deliver(sts_config(world, certs, sts, **extra), "example.test",
                            [rcpt("u@example.test")], world.source(MESSAGE))
        assert out["u@example.test"].status == DELIVERED and info["mta_sts"] == "skipped"
    assert sts.requests("example.test") == 0


def test_feature_off_leaves_no_trace(world: MailWorld, certs: Certs, sts: PolicyServer) -> None:
    serve(world, None)
    out, info = deliver(world.config(), "example.test", [rcpt("u@example.test")],
                        world.source(MESSAGE))
    assert out["u@example.test"].status == DELIVERED and "mta_sts" not in info
    assert world.dns.count("_mta-sts.example.test") == 0 and sts.requests("example.test") == 0


# -- through the daemon ---------------------------------------------------------------------
def test_mta_sts_through_the_daemon(daemon_factory: Any, certs: Certs, tmp_path: Path) -> None:
    world_zone = zone()
    world_zone.update({
        "bad.test": {"MX": [(10, "mx1.example.test")]},  # its policy names another MX
        "_mta-sts.bad.test": {"TXT": ["v=STSv1; id=1;"]},
        "mta-sts.bad.test": {"A": [POLICY_HOST]},
    })
    bad_host = make_server_cert(tmp_path, certs.ca, "mta-sts.bad.test")
    with MailWorld(tmp_path, world_zone, hosts=["127.0.0.2"]) as world:
        serve(world, certs.good)
        server = PolicyServer(host=POLICY_HOST)
        server.add("example.test", policy(), certs.policy_host)
        server.add("bad.test", policy("enforce", "mx.bad.test"), bad_host)
        server.start()
        try:
            daemon = daemon_factory({
                "processes": {"receivers": 1, "delivery": 1},
                "delivery": {
                    "port": world.port, "queue_scan_interval": "0.2s",
                    "retry_base_delay": "30s", "retry_jitter_factor": 0,
                    "dns": {"resolver": f"127.0.0.1:{world.dns.port}", "timeout": "2s"},
                    "tls": {"ca_file": certs.ca.cert_path},
                    "mta_sts": {"enabled": True, "port": server.port,
                                "ca_file": certs.ca.cert_path}}})
            with daemon.smtp() as client:
                for to in ("a@example.test", "b@example.test", "c@bad.test"):
                    client.sendmail("sender@localhost", [to], b"Subject: sts\r\n\r\nHi.\r\n")
            sink = world.sink("127.0.0.2")
            daemon.wait_for(lambda: len(sink.messages) == 2, 30, "two messages at the sink")
            assert all(m.tls for m in sink.messages)
            assert sorted(r for m in sink.messages for r in m.recipients) == [
                "a@example.test", "b@example.test"]
            spool = Spool(str(daemon.spool_path))
            [qid] = daemon.wait_for(lambda: spool.list_ids("deferred"), 30, "c@bad.test deferred")
            env = read_envelope(spool.path("deferred", qid))
            assert "MTA-STS" in env["recipients"][0]["last"]["text"]
            [route] = env["attempts"][-1]["routes"]
            assert (route["mta_sts"], route["mta_sts_result"]) == ("enforce", "failed")
            assert server.requests("example.test") == 1  # the second message used the cache
            assert server.requests("bad.test") == 1
        finally:
            server.stop()


def test_outbound_tls_handshakes_are_counted(world: MailWorld, certs: Certs,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from empath.observe import metrics

    counted: list[tuple[str, ...]] = []

    class Sessions:  # stands for the counter: labels(version).inc()
        def labels(self, *values: str) -> Any:
            return SimpleNamespace(inc=lambda amount=1.0: counted.append(values))

    instruments = metrics.Instruments(False)  # every other instrument a no-op
    instruments.tls_sessions_out = Sessions()
    monkeypatch.setattr(metrics, "_current", instruments)
    serve(world, certs.good)
    cfg = world.config(tls={"default_policy": "required", "ca_file": certs.ca.cert_path},
                       connection_reuse={"max_idle": 0})
    for _ in range(2):
        out, info = deliver(cfg, "example.test", [rcpt("u@example.test")],
                            world.source(MESSAGE))
        assert out["u@example.test"].status == DELIVERED
    assert counted == [(info["tls"]["version"],)] * 2
