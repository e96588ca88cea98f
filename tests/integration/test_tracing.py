"""Tracing through the real daemon: spans exported over OTLP/HTTP to a receiver on loopback.

A message is received by a receiver process, deferred by the destination (451 to RCPT) on the
first attempt of a delivery worker, and delivered on a later one. The test decodes what went
over the wire (``tests/support/otlpserver.py``, opentelemetry-proto) and checks that the
receipt and both attempts, with their routes, DNS lookups and SMTP phases, are spans of one
trace, parented as docs/OPERATIONS.md ("Tracing") says, with their attributes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import make_ca, make_server_cert
from tests.support.dnsserver import DNSServer
from tests.support.fixtures import DaemonFactory
from tests.support.otlpserver import OTLPReceiver, Span
from tests.support.sink import Behaviour, SinkServer

WAIT = 30.0
ID_RE = re.compile(r"queued as ([0-9A-Z]{26})")
ZONE = {"trace.test": {"MX": [(10, "mx.trace.test")]},
        "mx.trace.test": {"A": ["127.0.0.1"]}}


@pytest.fixture
def otlp() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


def attempts(spans: list[Span], queue_id: str) -> list[Span]:
    return sorted((s for s in spans if s.name == "delivery.attempt"
                   and s.attributes.get("empath.queue_id") == queue_id),
                  key=lambda s: s.attributes["empath.attempt"])


def test_receipt_deferral_and_delivery_are_one_trace(daemon_factory: DaemonFactory,
                                                     otlp: OTLPReceiver,
                                                     tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "certs")
    cert = make_server_cert(tmp_path / "certs", ca, "mx.trace.test", ips=["127.0.0.1"])
    busy = Behaviour(tls_cert=cert.cert_path, tls_key=cert.key_path,
                     rcpt_default=(451, "4.2.1 mailbox busy, try later"))
    sink = SinkServer(busy).start()
    dns = DNSServer(ZONE).start()
    try:
        overrides: dict[str, Any] = {
            "processes": {"receivers": 1, "delivery": 1},
            "relay_domains": ["trace.test"],
            "tracing": {"enabled": True, "endpoint": otlp.endpoint,
                        "service_name": "empath-test", "export_interval": "100ms"},
            "delivery": {"port": sink.port, "queue_scan_interval": "0.2s",
                         "retry_base_delay": "1s", "retry_max_delay": "1s",
                         "retry_jitter_factor": 0,
                         "dns": {"resolver": f"127.0.0.1:{dns.port}", "timeout": "2s"},
                         "tls": {"ca_file": ca.cert_path}},
        }
        d = daemon_factory(overrides)
        with d.smtp() as client:
            client.ehlo("client.test")
            client.mail("alice@example.org")
            client.rcpt("bob@trace.test")
            code, reply = client.data(b"Subject: traced\r\n\r\nhello\r\n")
            assert code == 250, reply
        match = ID_RE.search(reply.decode())
        assert match
        queue_id = match.group(1)

        first = otlp.wait_for(lambda spans: attempts(spans, queue_id), WAIT,
                              "the first delivery attempt")[0]
        assert first.attributes["empath.outcome"] == "deferred"
        sink.behaviour = Behaviour(tls_cert=cert.cert_path, tls_key=cert.key_path)
        sink.wait_for_messages(1, timeout=WAIT)
        otlp.wait_for(lambda spans: [a for a in attempts(spans, queue_id)
                                     if a.attributes.get("empath.outcome") == "delivered"],
                      WAIT, "the successful attempt")
        spans = otlp.spans()
    finally:
        sink.stop()
        dns.stop()

    (message,) = [s for s in spans if s.name == "smtp.message"]
    (session,) = [s for s in spans if s.name == "smtp.session"]
    trace = message.trace_id
    assert message.parent_id == session.span_id and session.trace_id == trace
    assert message.attributes["empath.queue_id"] == queue_id
    assert message.attributes["client.address"] == "127.0.0.1"
    assert message.attributes["empath.message.size"] > len(b"Subject: traced\r\n\r\nhello\r\n")
    assert message.attributes["empath.outcome"] == "stored"
    assert session.attributes["client.address"] == "127.0.0.1"
    assert session.attributes["empath.messages"] == 1
    assert {s.service for s in spans} == {"empath-test"}

    tried = attempts(spans, queue_id)
    assert [a.attributes["empath.attempt"] for a in tried] == list(range(1, len(tried) + 1))
    assert tried[0].attributes["empath.outcome"] == "deferred"
    assert tried[-1].attributes["empath.outcome"] == "delivered"
    for attempt in tried:
        # Another process, later: the receipt's span is the parent (the stored traceparent).
        assert attempt.trace_id == trace and attempt.parent_id == message.span_id
        assert attempt.attributes["empath.domains"] == ["trace.test"]
        assert attempt.attributes["empath.mx_hosts"] == ["mx.trace.test"]
        assert attempt.attributes["empath.tls"] is True
        assert attempt.start_ns >= message.end_ns
        routes = [s for s in spans if s.name == "delivery.route"
                  and s.parent_id == attempt.span_id]
        assert len(routes) == 1
        route = routes[0]
        assert route.trace_id == trace
        assert route.attributes["empath.domain"] == "trace.test"
        assert route.attributes["empath.mx_host"] == "mx.trace.test"
        assert route.attributes["server.address"] == "127.0.0.1"
        assert route.attributes["empath.attempt"] == attempt.attributes["empath.attempt"]
        assert route.attributes["empath.tls"] is True
        assert str(route.attributes["tls.protocol.version"]).startswith("TLSv1")
        assert route.attributes["empath.outcome"] == attempt.attributes["empath.outcome"]
        phases = {s.name: s for s in spans if s.parent_id == route.span_id}
        assert "smtp.transaction" in phases
        replies = [e[1]["smtp.reply.code"] for e in phases["smtp.transaction"].events
                   if e[0] == "smtp.reply"]
        want = 451 if attempt is tried[0] else 250
        assert want in replies, replies

    first_route = next(s for s in spans if s.name == "delivery.route"
                       and s.parent_id == tried[0].span_id)
    children = [s for s in spans if s.parent_id == first_route.span_id]
    lookups = {(s.attributes["dns.question.name"], s.attributes["dns.question.type"])
               for s in children if s.name == "dns.lookup"}
    assert ("trace.test", "MX") in lookups and ("mx.trace.test", "A") in lookups
    (connect,) = [s for s in children if s.name == "smtp.connect"]
    greeting = [e[1]["smtp.reply.code"] for e in connect.events if e[0] == "smtp.reply"]
    assert greeting[:2] == [220, 250]  # the banner, then EHLO; STARTTLS and EHLO again follow
    assert connect.attributes["empath.tls"] is True
    # Every span of this message's story belongs to its trace.
    assert {s.trace_id for s in spans if s.name != "smtp.session"} == {trace}


def test_an_unreachable_collector_costs_no_mail(daemon_factory: DaemonFactory) -> None:
    """Tracing on, nothing listening at the endpoint: every message is still received and
    delivered, and the daemon stops cleanly (the export thread gives up on its own)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a port with nothing behind it: connections are refused
    d = daemon_factory({"tracing": {"enabled": True, "export_interval": "50ms",
                                    "export_timeout": "1s",
                                    "endpoint": f"http://127.0.0.1:{port}/v1/traces"}})
    for i in range(5):
        with d.smtp() as client:
            client.sendmail("a@localhost", ["u1@localhost"], b"Subject: %d\r\n\r\nx\r\n" % i)
    maildir = d.dir / "mail" / "u1" / "new"
    d.wait_for(lambda: len(list(maildir.glob("*"))) == 5, WAIT, "5 messages delivered")
    assert d.stop() == 0
